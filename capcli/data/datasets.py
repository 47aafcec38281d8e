"""Datasets on disk -> ``Sample(image, captions, split)``: layouts, caption tables, splits.

Layouts are recognised by what the data folder holds (see ``load_dataset``). Every caption of an
image lands in the same split: the dataset's own split where it has one, otherwise a split by a
hash of the image's file name, stable across machines and runs. ``load_dataset`` returns a
``Dataset``: the samples, the layout found, where the split comes from and what was left out.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from capcli.data.drawings import DRAWING_TABLE, Drawing, read_drawing_table, require_rdkit
from capcli.data.splits import (
    DEFAULT_SPLIT,
    SPLITS,
    _ratio_text,
    hash_split,
    parse_split_ratios,
)
from capcli.data.tables import (
    IMAGE_COLUMNS,
    _open_text,
    _text,
    read_caption_table,
    table_delimiter,
)
from capcli.errors import CapcliError
from capcli.files import FileProblem, parse_json

log = logging.getLogger("capcli")


@dataclass(frozen=True)
class Sample:
    image: Path | Drawing  # an image file, or a molecule drawn when loaded (data.drawings)
    captions: tuple[str, ...]
    split: str  # "train" | "val" | "test"


# --------------------------------------------------------------------------- splits


# --------------------------------------------------------------------------- caption tables


# --------------------------------------------------------------------------- assembling samples

@dataclass
class Dataset:
    """What ``load_dataset`` found: the samples, the layout, where the split comes from, what was left out."""
    samples: list[Sample]
    layout: str  # e.g. "Kaggle Flickr8k (captions.txt + Images/)"
    split_source: str  # e.g. "hash 90/5/5 of image names"; model files record it, evaluate compares it
    hashed: int = 0  # images split by name hash: the data gives them no split of its own
    dropped: list[str] = field(default_factory=list)  # e.g. "5 captions of 1 image not found on disk"

    def counts(self) -> dict[str, int]:
        return split_counts(self.samples)

    def summary(self) -> str:
        c = self.counts()
        text = (f"data: {self.layout}; split from {self.split_source}; {_plural(len(self.samples), 'image')}: "
                f"train {c['train']}, val {c['val']}, test {c['test']}")
        return text + (f"; dropped {', '.join(self.dropped)}" if self.dropped else "")


# Split names other datasets use ('restval': the Karpathy split's extra training images).
_SPLIT_ALIASES = {"restval": "train", "training": "train", "dev": "val", "valid": "val", "validation": "val", "testing": "test"}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _assemble(
    entries: Iterable[tuple[Path, str, str | None]],
    ratios: Sequence[float],
    source: str,
    layout: str,
    own_split: str,
    dropped: Sequence[str] = (),
) -> Dataset:
    """Group (image path, caption, split or None) into a Dataset; skip empties, duplicates, missing images.

    ``own_split`` says where the data's own splits come from; images without one are split by name hash.
    """
    captions: dict[Path, list[str]] = {}
    splits: dict[Path, str | None] = {}
    seen: set[tuple[Path, str]] = set()
    dropped = list(dropped)
    empty = duplicates = 0
    for image_path, caption, split in entries:
        caption = " ".join(caption.split())
        if not caption:
            empty += 1
            continue
        if (image_path, caption) in seen:
            duplicates += 1
            continue
        seen.add((image_path, caption))
        captions.setdefault(image_path, []).append(caption)
        if split is not None:
            split = str(split).strip().lower()
            splits[image_path] = _SPLIT_ALIASES.get(split, split)
        else:
            splits.setdefault(image_path, None)
    if empty:
        log.warning("%s: skipped %s", source, _plural(empty, "empty caption"))
        dropped.append(_plural(empty, "empty caption"))
    if duplicates:
        log.warning("%s: skipped %s", source, _plural(duplicates, "duplicate caption"))
        dropped.append(_plural(duplicates, "duplicate caption"))
    if not captions:
        raise CapcliError(f"{source}: no usable captions (all are empty)" if empty else f"{source}: no captions in the file")
    samples, missing_images, missing_captions, unknown_splits, hashed = [], 0, 0, Counter(), 0
    first_missing = None
    for image_path, caps in captions.items():
        if not image_path.is_file():
            missing_images += 1
            first_missing = first_missing or image_path
            missing_captions += len(caps)
            continue
        split = splits[image_path]
        if split not in SPLITS:
            if split is not None:
                unknown_splits[split] += 1
            split = hash_split(image_path.name, ratios)
            hashed += 1
        samples.append(Sample(image_path, tuple(caps), split))
    if missing_images:
        what = f"{_plural(missing_captions, 'caption')} of {_plural(missing_images, 'image')} not found on disk"
        log.warning("%s: skipped %s", source, what)
        dropped.append(what)
    if unknown_splits:
        names = ", ".join(repr(k) for k in sorted(unknown_splits))
        n = sum(unknown_splits.values())
        log.warning("%s: %d image%s with an unknown split (%s) split by name hash instead", source, n, "s" * (n != 1), names)
    if not samples:
        raise CapcliError(f"{source}: no usable captions: none of the {missing_images} images they name is on disk "
                          f"(looked for {first_missing} and the others in {first_missing.parent}; --images DIR "
                          f"says where they are)")
    samples.sort(key=lambda s: str(s.image))
    by_hash = f"hash {_ratio_text(ratios)} of image names"
    split_source = own_split if hashed == 0 else by_hash if hashed == len(samples) else f"{own_split}; images without one: {by_hash}"
    return Dataset(samples, layout, split_source, hashed, dropped)


def _lists_drawings(path: Path, text: str) -> bool:
    """A CSV or TSV table whose header has a ``smiles`` column and no image column lists molecules to draw."""
    header = {c.strip().lower() for c in text.split("\n", 1)[0].split(table_delimiter(path, text))}
    return "smiles" in header and not header & set(IMAGE_COLUMNS)


def _load_drawings(table: Path, text: str, ratios: Sequence[float]) -> Dataset:
    """A table of molecules drawn when loaded (data.drawings): one image and one caption per row."""
    require_rdkit(str(table))
    samples, unknown, hashed = [], Counter(), 0
    for drawing, split in read_drawing_table(table, text, table_delimiter(table, text)):
        split = _SPLIT_ALIASES.get(split.lower(), split.lower()) if split else None
        if split not in SPLITS:
            if split is not None:
                unknown[split] += 1
            split = hash_split(drawing.smiles, ratios)  # by molecule: its drawings all land in one split
            hashed += 1
        samples.append(Sample(drawing, (drawing.smiles,), split))
    if unknown:
        names = ", ".join(repr(k) for k in sorted(unknown))
        log.warning("%s: %s with an unknown split (%s) split by a hash of the SMILES instead", table,
                    _plural(sum(unknown.values()), "drawing"), names)
    by_hash = f"hash {_ratio_text(ratios)} of the SMILES"
    own = "the file's split column"
    split_source = own if hashed == 0 else by_hash if hashed == len(samples) else f"{own}; drawings without one: {by_hash}"
    return Dataset(samples, f"molecules drawn on the fly ({table.name})", split_source, hashed)


def _find(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for candidate in (root / name, root / "Flickr8k_text" / name, root / "annotations" / name):
            if candidate.is_file():
                return candidate
    return None


def _first_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def load_dataset(
    data_dir: str | Path | None = None,
    *,
    captions_file: str | Path | None = None,
    images_dir: str | Path | None = None,
    split_ratios: Sequence[float] | None = None,
) -> Dataset:
    """Find the captions and images under ``data_dir`` (or the explicit files) and return a Dataset.

    Recognised layouts, tried in this order:
      1. Karpathy split JSON: dataset_flickr8k.json / dataset_flickr30k.json / dataset_coco.json
      2. COCO caption annotations: annotations/captions_{train,val}{2014,2017}.json + image folders
      3. Original Flickr8k: Flickr8k.token.txt (+ Flickr_8k.{train,dev,test}Images.txt), Flicker8k_Dataset/
      4. Molecules drawn on the fly: molecules.csv (data.drawings), or a ``captions_file`` like it
      5. Kaggle Flickr8k: captions.txt + Images/
      6. Generic: ``captions_file`` (CSV, TSV, JSONL) + ``images_dir``
    ``split_ratios`` (train, val, test; None: 90/5/5) split the images the data gives no split, by
    name hash. Logs one line saying what was found.
    """
    ratios = DEFAULT_SPLIT if split_ratios is None else tuple(split_ratios)
    if captions_file is not None:
        captions_file = Path(captions_file)
        source, text = str(captions_file), _open_text(captions_file)
        if _lists_drawings(captions_file, text):
            dataset = _load_drawings(captions_file, text, ratios)
        else:
            images = Path(images_dir) if images_dir is not None else captions_file.parent
            if not images.is_dir():
                raise CapcliError(f"{images}: image folder not found")
            rows = read_caption_table(captions_file, text)
            dataset = _assemble(((images / r.image, r.caption, r.split) for r in rows), ratios, source,
                                f"caption file {captions_file.name}", "the file's split column")
    else:
        if data_dir is None:
            raise CapcliError("give --data DIR, or --captions FILE with --images DIR")
        root = Path(data_dir)
        if root.is_file():
            raise CapcliError(f"{root}: is a file, --data takes a dataset folder (for a caption file: "
                              f"--captions FILE --images DIR)")
        if not root.is_dir():
            raise CapcliError(f"{root}: data folder not found")
        source = str(root)
        dataset = _load_folder(root, Path(images_dir) if images_dir is not None else None, ratios)
    if dataset.hashed == 0 and _ratio_text(ratios) != _ratio_text(DEFAULT_SPLIT):
        log.warning("%s: split ratios %s not used: the split comes from %s", source, _ratio_text(ratios), dataset.split_source)
    log.info("%s", dataset.summary())
    return dataset


def _load_folder(root: Path, images: Path | None, ratios: Sequence[float]) -> Dataset:
    if karpathy := _find(root, ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")):
        return _load_karpathy(karpathy, root, images, ratios)
    coco = sorted((root / "annotations").glob("captions_*.json")) if (root / "annotations").is_dir() else []
    if coco:
        return _load_coco(coco, root, images, ratios)
    if token := _find(root, ("Flickr8k.token.txt",)):
        return _load_flickr8k_original(token, root, images, ratios)
    if (root / DRAWING_TABLE).is_file():
        table = root / DRAWING_TABLE
        return _load_drawings(table, _open_text(table), ratios)
    if (root / "captions.txt").is_file():
        images = images or _first_dir(root, ("Images", "images")) or root
        rows = read_caption_table(root / "captions.txt")
        layout = f"Kaggle Flickr8k (captions.txt + {images.name}/)" if images != root else "Kaggle Flickr8k (captions.txt)"
        return _assemble(((images / r.image, r.caption, r.split) for r in rows), ratios, str(root / "captions.txt"),
                         layout, "the file's split column")
    raise CapcliError(
        f"{root}: no dataset found (expected captions.txt + Images/, Flickr8k.token.txt, "
        f"dataset_*.json, or annotations/captions_*.json; or use --captions FILE --images DIR)"
    )


def _load_json(path: Path) -> object:
    try:
        return parse_json(_open_text(path), str(path))
    except FileProblem as e:
        raise CapcliError(str(e)) from None


def _load_karpathy(path: Path, root: Path, images: Path | None, ratios) -> Dataset:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CapcliError(f"{path}: not a Karpathy split file (no 'images' list)")
    image_roots = [images] if images else [root, *(d for d in (root / "Images", root / "images", root / "Flicker8k_Dataset", root / "flickr30k_images") if d.is_dir())]

    def locate(entry: dict) -> Path:
        rel = Path(entry.get("filepath") or "") / entry["filename"]
        for base in image_roots:
            for candidate in (base / rel, base / entry["filename"]):
                if candidate.is_file():
                    return candidate
        return image_roots[0] / rel

    def entries():
        for i, entry in enumerate(data["images"]):
            try:
                image_path = locate(entry)
                sentences = [_text(s["raw"]) if "raw" in s else " ".join(map(_text, s["tokens"])) for s in entry["sentences"]]
                split = entry.get("split")
            except (KeyError, TypeError, AttributeError):  # a field missing, or of the wrong JSON type
                raise CapcliError(f"{path}: images[{i}] lacks 'filename' or 'sentences' with 'raw' captions") from None
            for sentence in sentences:
                yield image_path, sentence, split

    return _assemble(entries(), ratios, str(path), f"Karpathy split ({path.name})", f"the Karpathy split in {path.name}")


_COCO_YEAR = re.compile(r"(20\d\d)$")


def _load_coco(files: list[Path], root: Path, images: Path | None, ratios) -> Dataset:
    """COCO annotation files; train files -> train, val files -> half val, half test (by hash)."""
    stems = {path: path.stem.split("_", 1)[-1] for path in files}  # captions_train2014 -> train2014
    years = {path: m.group(1) if (m := _COCO_YEAR.search(stem)) else None for path, stem in stems.items()}
    if {"2014", "2017"} <= set(years.values()):
        # train2017 = train2014 + most of val2014: with both years, val2014 images would be trained on.
        log.warning("%s: both COCO 2014 and 2017 captions found; using 2014 only, as Karpathy's split and most "
                    "captioning papers do (2017's train set holds 2014's val images, which would leak into "
                    "training); remove one year's files to choose", files[0].parent)
        files = [path for path in files if years[path] != "2017"]
    train_stems = [stems[p] for p in files if "train" in stems[p]]
    val_stems = [stems[p] for p in files if "train" not in stems[p]]
    used_years = sorted({years[p] for p in files if years[p]})
    layout = f"COCO {'+'.join(used_years)} annotations" if used_years else "COCO annotations"
    rules = ([f"{', '.join(train_stems)} -> train"] if train_stems else []) + \
            ([f"{', '.join(val_stems)} -> half val / half test by name hash"] if val_stems else [])

    def entries():
        for path in files:
            data = _load_json(path)
            if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
                raise CapcliError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
            stem = stems[path]
            folder = images or _first_dir(root, (stem, f"images/{stem}")) or root
            try:
                names = {img["id"]: _text(img["file_name"]) for img in data["images"]}
                anns = [(names.get(ann["image_id"]), _text(ann["caption"])) for ann in data["annotations"]]
            except (KeyError, TypeError):  # an entry that is not an object, or lacks a field
                raise CapcliError(f"{path}: not a COCO captions file (images need 'id' and 'file_name', "
                                  f"annotations 'image_id' and 'caption')") from None
            unknown = sum(name is None for name, _ in anns)
            if unknown:
                log.warning("%s: skipped %d caption%s of unknown image ids", path, unknown, "s" * (unknown != 1))
                dropped.append(f"{_plural(unknown, 'caption')} of unknown image ids in {path.name}")
            is_train = "train" in stem
            for name, caption in anns:
                if name is None:
                    continue
                split = "train" if is_train else ("val" if hash_split(name, (0, 0.5, 0.5)) == "val" else "test")
                yield folder / name, caption, split

    dropped: list[str] = []  # filled while _assemble reads the entries
    dataset = _assemble(entries(), ratios, str(files[0].parent), layout, "COCO: " + ", ".join(rules))
    dataset.dropped[:0] = dropped
    return dataset


_FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def _load_flickr8k_original(token: Path, root: Path, images: Path | None, ratios) -> Dataset:
    """Flickr8k.token.txt; the official split files decide the split, any of them may be missing.

    With all three, images none of them lists are left out, as in the papers; with some, those
    images go to the splits whose files are missing, by name hash in the ratios of those splits.
    """
    folder = images or _first_dir(root, ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")) or root
    split_of: dict[str, str] = {}
    not_on_disk: list[tuple[str, Path]] = []
    listings = {split: _find(root, (name,)) for split, name in _FLICKR8K_SPLIT_FILES.items()}
    for split, listing in listings.items():
        for line in _open_text(listing).splitlines() if listing else ():
            if name := line.strip():
                split_of[name] = split
                if not (folder / name).is_file():
                    not_on_disk.append((name, listing))
    if not_on_disk:
        name, listing = not_on_disk[0]
        log.warning("%s: %s named in the split files %s not on disk (first: %s, in %s)", folder,
                    _plural(len(not_on_disk), "image"), "are" if len(not_on_disk) != 1 else "is", name, listing.name)

    found = [split for split, listing in listings.items() if listing]
    missing = [split for split in SPLITS if split not in found]
    # The ratios of the splits without a file, for the images no file lists (all 0: they are left out).
    rest = [r if split in missing else 0.0 for split, r in zip(SPLITS, ratios)]
    rest = [r / sum(rest) for r in rest] if found and sum(rest) > 0 else None
    unlisted: set[str] = set()

    def entries():
        for line_no, line in enumerate(_open_text(token).splitlines(), 1):
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            if not sep:
                raise CapcliError(f"{token}:{line_no}: expected 'name.jpg#N<TAB>caption'")
            name = key.split("#")[0].strip()
            split = split_of.get(name)
            if split is None and found:
                unlisted.add(name)
                if rest is None:
                    continue  # left out
                split = hash_split(name, rest)
            yield folder / name, caption, split

    layout = f"original Flickr8k ({token.name} + {folder.name}/)"
    if not found:
        return _assemble(entries(), ratios, str(token), layout, "no split files")  # every image by name hash
    if not missing:
        own = "the official split files Flickr_8k.{train,dev,test}Images.txt"
    else:
        own = f"the official split file{'s' * (len(found) > 1)} {', '.join(_FLICKR8K_SPLIT_FILES[s] for s in found)}"
        if rest is not None:
            into = {s: r for s, r in zip(SPLITS, ratios) if s in missing and r > 0}  # e.g. train 0.9, val 0.05
            shares = ":".join(f"{round(r * 100, 1):g}" for r in into.values())
            own += f"; images in none of them: hash {shares} of image names into {'/'.join(into)}"
    dataset = _assemble(entries(), ratios, str(token), layout, own)
    if rest is not None:  # the unlisted images were split by hash, here rather than in _assemble
        dataset.hashed = sum(s.image.name in unlisted for s in dataset.samples)
    elif unlisted:
        log.warning("%s: left out %s that no split file lists (as in the papers)", token, _plural(len(unlisted), "image"))
        dataset.dropped.append(f"{_plural(len(unlisted), 'image')} in no split file")
    return dataset


def split_counts(samples: Sequence[Sample]) -> dict[str, int]:
    counts = Counter(s.split for s in samples)
    return {s: counts.get(s, 0) for s in SPLITS}


def split_mismatch(trained: dict, dataset: Dataset, ratios: Sequence[float] | None) -> str | None:
    """Where a model's training split came from, when ``dataset``'s split may differ from it; else None.

    ``trained``: the model file's training summary ("split": ratios such as "80/10/10", "split_source":
    the training data's Dataset.split_source); ``ratios``: those ``dataset`` was loaded with (None: 90/5/5).
    """
    if trained.get("split_source"):
        return None if trained["split_source"] == dataset.split_source else trained["split_source"]
    if not trained.get("split"):
        return "a source the model file does not record"
    # Older model files record only the ratios: compare those, where they decide the split.
    recorded = _ratio_text(parse_split_ratios(trained["split"]))
    if dataset.hashed and recorded != _ratio_text(DEFAULT_SPLIT if ratios is None else ratios):
        return f"hash {recorded} of image names"
    return None
