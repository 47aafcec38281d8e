"""examples/molecules/make_dataset.py with --moses: molecules drawn from MOSES are train-only, and a
val or test molecule of the user's set is never drawn for training, with or without its stereo."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import pytest

Chem = pytest.importorskip("rdkit.Chem")
SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "molecules" / "make_dataset.py"
OWN = ["CCO", "CCN", "CCC", "c1ccccc1", "c1ccncc1", "CC(=O)O", "CC(=O)N", "CCCl", "CCBr", "CC=O", "C1CCCCC1",
       "C1CCNCC1", "CC(C)O", "CC(C)N", "OCCO", "NCCN", "C[C@H](N)O", "CCOC", "CCSC", "c1ccoc1", "c1ccsc1",
       "CC#N", "C=CC", "CC(C)(C)O", "FC(F)F", "ClCCl", "CCCCO", "CCCCN", "c1ccc(O)cc1", "c1ccc(N)cc1"]
NEW = ["CCCCCC", "CCCCCCO", "CCCCCCN", "c1ccc(Cl)cc1", "c1ccc(Br)cc1", "CC(=O)OC", "CC(=O)NC", "OC(=O)CCC(=O)O",
       "c1ccc2ccccc2c1", "CCOCC", "CCSCC", "CCN(C)C"]


def canon(smiles: str, stereo: bool = True) -> str:
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles), isomericSmiles=stereo)


def test_moses_molecules_are_train_only_and_never_a_held_out_molecule(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from make_dataset import split_of
    finally:
        sys.path.pop(0)
    own = tmp_path / "own.csv"
    own.write_text("smiles\n" + "\n".join(OWN) + "\n")
    held_out = [canon(s) for s in OWN if split_of(canon(s), 0.2, 0.2) != "train"]
    assert held_out, "the split should hold some molecules out"
    # MOSES's file as the molsets wheel ships it, holding the held-out molecules (one without its
    # stereo, as MOSES writes them) among new ones
    moses = tmp_path / "train.csv.gz"
    rows = NEW + [canon(s, stereo=False) for s in held_out]
    with gzip.open(moses, "wt") as f:
        f.write("SMILES\n" + "\n".join(rows) + "\n")
    out = tmp_path / "data"
    r = subprocess.run([sys.executable, str(SCRIPT), str(own), str(out), "--val", "0.2", "--test", "0.2",
                        "--test-sizes", "", "--workers", "1", "--moses", "100", "--moses-file", str(moses)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(out / "captions.txt", newline="") as f:
        table = list(csv.DictReader(f))
    train = {row["caption"] for row in table if row["split"] == "train"}
    others = {row["caption"] for row in table if row["split"] != "train"}
    drawn = {row["caption"] for row in table if row["image"].startswith("z")}
    assert drawn == {canon(s) for s in NEW}  # every new MOSES molecule, none held out
    assert all(row["split"] == "train" for row in table if row["image"].startswith("z"))
    assert not {canon(s, stereo=False) for s in train} & {canon(s, stereo=False) for s in others}
    assert f"MOSES {len(NEW)}/100 ({len(held_out)} val/test molecules passed over)" in r.stderr  # all looked at
    assert all((out / "Images" / row["image"]).is_file() for row in table)
