"""Render molecules (SMILES) with RDKit into an image-to-SMILES dataset in capcli's "Kaggle" layout.

    python examples/molecules/make_dataset.py SMILES_CSV OUT_DIR [--size 300] [--variants K]
        [--val 0.05] [--test 0.05] [--test-sizes 224,500] [--brics N] [--moses N [--moses-file F]]
        [--seed 0] [--workers 2] [--table]

SMILES_CSV has a `smiles` column (or is a single column without header). Writes OUT_DIR/Images/*.png
and OUT_DIR/captions.txt (CSV: image,caption,split; caption = RDKit canonical SMILES). The split is
by molecule, from a hash of its canonical SMILES, so no molecule appears in two splits. val/test
images are RDKit's default depiction at --size; train molecules get variant 0 (default depiction)
plus K-1 augmented renders. Test molecules are also drawn at --test-sizes, listed separately in
OUT_DIR/captions_test_sizes.csv. --brics N adds N train-only molecules recombined from BRICS
fragments of the train molecules. --moses N adds N train-only molecules drawn from MOSES (1.58M
drug-like ZINC molecules, the `train.csv.gz` inside the `molsets` wheel: `pip install --no-deps
molsets`, whose pinned dependencies need not be installed, or --moses-file PATH to that .csv.gz or
to the wheel itself); a MOSES molecule that is one of SMILES_CSV's val or test molecules (by
canonical SMILES, with and without stereo) is never drawn. Same arguments -> same files.

--table writes no images: OUT_DIR/molecules.csv lists each drawing (name, smiles, split, size,
augment) and capcli draws it when it is needed, the same picture as the file would hold (see
capcli.data.drawings); the extra test sizes go to OUT_DIR/molecules_test_SIZE.csv. For 10^5-10^6
drawings, which would be as many files. Needs capcli and RDKit (pip install -e '.[chem]').
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import os
import random
import sys
import time
import zipfile
from importlib.util import find_spec
from multiprocessing import Pool
from pathlib import Path

from rdkit import Chem, RDLogger
from rdkit.Chem import BRICS

from capcli.data.drawings import DRAWING_TABLE, Drawing

RDLogger.DisableLog("rdApp.*")  # thousands of parse/sanitize warnings would drown the progress lines


def key_int(text: str) -> int:
    """A stable 64-bit integer for a string (Python's hash() changes with PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def split_of(smiles: str, val: float, test: float) -> str:
    u = key_int(smiles) / 2**64  # uniform in [0, 1), fixed per molecule and independent of --seed
    return "test" if u < test else "val" if u < test + val else "train"


def read_smiles(path: str) -> list[str]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and r[0].strip()]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "smiles" in header:
        col = header.index("smiles")
        return [r[col] if col < len(r) else "" for r in rows[1:]]
    if len(header) > 1:
        sys.exit(f"{path}: no 'smiles' column in the header {rows[0]}")
    return [r[0] for r in rows]  # one column, no header


def render(task: tuple[str, str, int, int | None]) -> str:
    """Worker: (path, smiles, size, augmentation key or None) -> path written."""
    path, smiles, size, key = task
    Drawing(path, smiles, size, key).render().save(path)
    return path


def brics_molecules(train: list[str], n: int, taken: set[str], seed: int) -> list[str]:
    """Up to n new molecules built from BRICS fragments of the train molecules only."""
    frags = sorted(set().union(*(BRICS.BRICSDecompose(Chem.MolFromSmiles(s)) for s in train)))  # sorted: sets of str have no stable order
    frags = [m for m in map(Chem.MolFromSmiles, frags) if m is not None]
    rng, made, seen = random.Random(seed), [], set(taken)
    # BRICSBuild over all fragments is combinatorial; small random subsets keep each call cheap and the
    # products diverse. scrambleReagents=False: its shuffle uses random.shuffle(x, random=...), which
    # Python 3.11 removed, and we shuffle (reproducibly) ourselves anyway. maxDepth=1 (up to ~3 fragments
    # joined) is ~10x faster than maxDepth=2 and gives molecules of about the originals' size.
    for _ in range(200 + 50 * n):
        if len(made) >= n or len(frags) < 2:
            break
        subset = rng.sample(frags, min(len(frags), 10))
        kept = 0
        for p in itertools.islice(BRICS.BRICSBuild(subset, scrambleReagents=False, maxDepth=1), 30):
            try:
                Chem.SanitizeMol(p)
                smi = Chem.MolToSmiles(p)
                again = Chem.MolFromSmiles(smi)
            except Exception:  # sanitization failures: Chem.AtomValenceException and friends
                continue
            if again is None or Chem.MolToSmiles(again) != smi or smi in seen:
                continue  # the caption must round-trip: workers re-parse the SMILES to draw it
            if 5 <= again.GetNumHeavyAtoms() <= 50 and len(smi) <= 100:
                seen.add(smi)
                made.append(smi)
                kept += 1
            if kept == 3 or len(made) >= n:  # a few per subset, so no one subset dominates
                break
    return made


MOSES_CSV = "moses/dataset/data/train.csv.gz"


def moses_lines(path: str | None):
    """The SMILES lines of MOSES's train.csv.gz, header dropped: from PATH (the .csv.gz or the
    molsets wheel), else from the installed molsets package, found without importing it (its
    __init__ imports torch and friends)."""
    import gzip

    if path is None:
        spec = find_spec("moses")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("--moses needs MOSES's train.csv.gz: pip install --no-deps molsets, or give --moses-file")
        path = str(Path(next(iter(spec.submodule_search_locations))) / "dataset" / "data" / "train.csv.gz")
    if zipfile.is_zipfile(path):
        raw = zipfile.ZipFile(path).open(MOSES_CSV)
    else:
        raw = open(path, "rb")
    with gzip.open(raw, "rt") as f:
        next(f, None)  # "SMILES"
        for line in f:
            if line.strip():
                yield line.strip().split(",")[0]


def flat(smiles: str) -> str:
    """Canonical SMILES without stereo: two drawings that look alike count as one molecule."""
    mol = Chem.MolFromSmiles(smiles)
    return Chem.MolToSmiles(mol, isomericSmiles=False) if mol is not None else smiles


def moses_molecules(n: int, path: str | None, held_out: set[str], taken: set[str], seed: int) -> tuple[list[str], int]:
    """n MOSES molecules in a seeded random order (reservoir sampling over the stream: one pass, n
    held), canonical, none of them held out (val/test, compared without stereo) or already taken.
    Returns them and how many held-out molecules were passed over."""
    rng = random.Random(seed)
    pool: list[str] = []
    wanted = 2 * n + 100  # room for the ones refused below
    for i, smi in enumerate(moses_lines(path)):
        if len(pool) < wanted:
            pool.append(smi)
        elif (j := rng.randrange(i + 1)) < wanted:
            pool[j] = smi
    rng.shuffle(pool)  # a reservoir that never filled holds the file's order
    made, refused = [], 0
    for smi in pool:
        mol = Chem.MolFromSmiles(smi)
        if mol is None:
            continue
        canon = Chem.MolToSmiles(mol)
        if flat(canon) in held_out:
            refused += 1
        elif canon not in taken:
            taken.add(canon)
            made.append(canon)
        if len(made) == n:
            break
    return made, refused


def write_csv(path: Path, rows: list[tuple], header: tuple[str, ...] = ("image", "caption", "split")) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)  # QUOTE_MINIMAL: a SMILES never has a comma, but quote if one ever does
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)  # an interrupted run never leaves a half-written caption file


def write_table(path: Path, drawings: list[tuple[str, str, str, int, int | None]]) -> None:
    """A table of drawings (capcli.data.drawings): named as their files would be, without .png."""
    write_csv(path, [(name.removesuffix(".png"), smi, sp, size, "" if key is None else key) for name, smi, sp, size, key in drawings],
              ("name", "smiles", "split", "size", "augment"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("smiles_csv", help="CSV with a 'smiles' column, or one SMILES per line")
    ap.add_argument("out_dir")
    ap.add_argument("--size", type=int, default=300, help="image size of the default depiction (default 300)")
    ap.add_argument("--variants", type=int, default=1, help="images per train molecule, the first the default depiction (default 1)")
    ap.add_argument("--val", type=float, default=0.05, help="fraction of molecules in val (default 0.05)")
    ap.add_argument("--test", type=float, default=0.05, help="fraction of molecules in test (default 0.05)")
    ap.add_argument("--test-sizes", default="224,500", help="extra sizes for test molecules, comma-separated ('' for none)")
    ap.add_argument("--brics", type=int, default=0, help="add N train-only molecules recombined from BRICS fragments")
    ap.add_argument("--moses", type=int, default=0, help="add N train-only molecules drawn from MOSES (see above)")
    ap.add_argument("--moses-file", default=None, help="MOSES's train.csv.gz, or the molsets wheel (default: the installed molsets)")
    ap.add_argument("--seed", type=int, default=0, help="seed for augmentation, BRICS and MOSES (not the split)")
    ap.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    ap.add_argument("--table", action="store_true", help=f"write {DRAWING_TABLE}, what to draw, instead of drawing Images/: capcli draws each when it is needed")
    args = ap.parse_args()
    if args.variants < 1 or not (0 <= args.val and 0 <= args.test and args.val + args.test <= 1):
        ap.error("need --variants >= 1, --val/--test >= 0 summing to at most 1")
    test_sizes = [int(s) for s in args.test_sizes.split(",") if s.strip()]
    t0 = time.time()

    canon, bad, dup = [], 0, 0
    seen: set[str] = set()
    for s in read_smiles(args.smiles_csv):
        mol = Chem.MolFromSmiles(s.strip())
        if mol is None:
            bad += 1
            continue
        smi = Chem.MolToSmiles(mol)  # canonical, stereo kept
        if smi in seen:
            dup += 1
            continue
        seen.add(smi)
        canon.append(smi)
    splits = [split_of(s, args.val, args.test) for s in canon]
    brics = brics_molecules([s for s, sp in zip(canon, splits) if sp == "train"], args.brics, seen, args.seed) if args.brics else []
    moses, refused = [], 0
    if args.moses:
        held_out = {flat(s) for s, sp in zip(canon, splits) if sp != "train"}
        moses, refused = moses_molecules(args.moses, args.moses_file, held_out, seen | set(brics), args.seed)

    out, images = Path(args.out_dir), Path(args.out_dir) / "Images"
    out.mkdir(parents=True, exist_ok=True)
    # What to draw, in the order of the files: (image file name, SMILES, split, size, augmentation key or None)
    drawings: list[tuple[str, str, str, int, int | None]] = []

    def add_train(prefix: str, i: int, smi: str) -> None:
        for k in range(args.variants):
            name = f"{prefix}{i:05d}_v{k}.png"
            drawings.append((name, smi, "train", args.size, None if k == 0 else key_int(f"{args.seed}|{name}")))

    for i, (smi, sp) in enumerate(zip(canon, splits)):
        if sp == "train":
            add_train("m", i, smi)
            continue
        for size in dict.fromkeys([args.size] + (test_sizes if sp == "test" else [])):
            drawings.append((f"m{i:05d}_s{size}.png", smi, sp, size, None))
    for i, smi in enumerate(brics):
        add_train("b", i, smi)
    for i, smi in enumerate(moses):
        add_train("z", i, smi)
    by_size = {size: [d for d in drawings if d[3] == size and d[2] == "test"] for size in test_sizes if size != args.size}
    main_rows = [d for d in drawings if d[3] == args.size or d[2] != "test"]

    t1 = time.time()
    if args.table:  # capcli draws each when it is needed; the same drawings as the files would hold
        write_table(out / DRAWING_TABLE, main_rows)
        for size, rows in by_size.items():
            write_table(out / f"molecules_test_{size}.csv", rows)
        made = f"{len(main_rows)} drawings listed in {DRAWING_TABLE} + {sum(map(len, by_size.values()))} test sizes"
    else:
        images.mkdir(exist_ok=True)
        # Each drawing carries its own seed, so the files do not depend on --workers or on chunk order.
        tasks = [(str(images / name), smi, size, key) for name, smi, _, size, key in drawings]
        with Pool(args.workers) if args.workers > 1 else _Serial() as pool:
            for done, _ in enumerate(pool.imap(render, tasks, chunksize=16), 1):
                if done % 1000 == 0:
                    print(f"[make_dataset] {done}/{len(tasks)} images, {time.time() - t1:.0f} s", file=sys.stderr, flush=True)
        write_csv(out / "captions.txt", [d[:3] for d in main_rows])
        if by_size:
            write_csv(out / "captions_test_sizes.csv", [d[:3] for rows in by_size.values() for d in rows])
        made = (f"images: {len(main_rows)} in captions.txt + {sum(map(len, by_size.values()))} test sizes, "
                f"{1000 * (time.time() - t1) / max(1, len(tasks)):.1f} ms per image")
    t2 = time.time()
    count = {sp: splits.count(sp) for sp in ("train", "val", "test")}
    print(f"[make_dataset] molecules: train {count['train']} + BRICS {len(brics)}/{args.brics} + MOSES "
          f"{len(moses)}/{args.moses} ({refused} val/test molecules passed over), val {count['val']}, "
          f"test {count['test']}; {made}; skipped: {bad} unparsable, {dup} duplicates; {t2 - t0:.1f} s "
          f"({t1 - t0:.1f} s parsing/BRICS)", file=sys.stderr)


class _Serial:
    """Stand-in for Pool with --workers 1: same imap, in this process (easier to debug)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)


if __name__ == "__main__":
    main()
