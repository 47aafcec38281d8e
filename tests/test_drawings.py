"""Molecules drawn on the fly (capcli.data.drawings): a table of SMILES is a dataset whose images RDKit
draws when they are loaded, the same pixels as make_dataset.py's files, trained on and evaluated
like any other; bad tables are one-line errors and an undrawable SMILES is a bad image."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit.Chem")

from capcli.data.datasets import load_dataset  # noqa: E402
from capcli.data.drawings import Drawing  # noqa: E402
from capcli.data.images import ImageError, image_batches  # noqa: E402
from capcli.errors import CapcliError  # noqa: E402
from capcli.model.config import ModelConfig  # noqa: E402
from capcli.train.feature_cache import cache_key  # noqa: E402
from conftest import SMALL, run_cli  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "molecules" / "make_dataset.py"
MOLECULES = ["CCO", "CCN", "c1ccccc1", "c1ccncc1", "CC(=O)O", "CC(=O)N", "CCCl", "C1CCCCC1", "C1CCNCC1",
             "CC(C)O", "OCCO", "C[C@H](N)O", "c1ccoc1", "c1ccsc1", "CC#N", "FC(F)F", "c1ccc(O)cc1", "CCOC(=O)C"]


def write_table(path: Path, rows: list[str], header: str = "name,smiles,split,size,augment") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def pixels(images: list) -> list:
    return [p for batch in image_batches(images, 96, 8, 2, overlap=False) for _, p in batch]


def test_a_table_draws_the_same_pixels_as_the_files_make_dataset_writes(tmp_path):
    own = tmp_path / "own.csv"
    own.write_text("smiles\n" + "\n".join(MOLECULES) + "\n")
    common = [sys.executable, str(SCRIPT), str(own)]
    options = ["--variants", "2", "--val", "0.2", "--test", "0.2", "--test-sizes", "224", "--workers", "1"]
    for out, extra in (("files", []), ("table", ["--table"])):
        r = subprocess.run(common + [str(tmp_path / out)] + options + extra, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert not (tmp_path / "table" / "Images").exists()
    drawn, files = load_dataset(tmp_path / "table"), load_dataset(tmp_path / "files")
    assert drawn.layout == "molecules drawn on the fly (molecules.csv)"
    drawn_samples = sorted(drawn.samples, key=lambda s: s.image.name)
    file_samples = sorted(files.samples, key=lambda s: s.image.name)
    assert [s.image.name for s in drawn_samples] == [s.image.stem for s in file_samples]
    assert [(s.captions, s.split) for s in drawn_samples] == [(s.captions, s.split) for s in file_samples]
    assert any(s.image.augment is not None for s in drawn_samples)  # varied drawings are compared too
    for a, b in zip(pixels([s.image for s in drawn_samples]), pixels([s.image for s in file_samples])):
        assert torch.equal(a, b)
    # the extra test size: a table of its own, given as a caption file
    sized = load_dataset(captions_file=tmp_path / "table" / "molecules_test_224.csv").samples
    assert sized and {s.split for s in sized} == {"test"} and {s.image.size for s in sized} == {224}
    assert {s.captions for s in sized} == {s.captions for s in drawn.samples if s.split == "test"}


def test_drawings_without_a_split_are_split_by_molecule(tmp_path, caplog):
    rows = [f"{smi},{smi},,300," for smi in MOLECULES] + [f"{smi} v{k},{smi},,,{k}" for smi in MOLECULES for k in (1, 2)]
    rows.append("odd,CCCCO,holdout,300,")
    with caplog.at_level(logging.WARNING, logger="capcli"):
        dataset = load_dataset(captions_file=write_table(tmp_path / "t.csv", rows), split_ratios=(0.5, 0.25, 0.25))
    assert "1 drawing with an unknown split ('holdout') split by a hash of the SMILES instead" in caplog.text
    assert dataset.split_source == "hash 50/25/25 of the SMILES" and dataset.hashed == len(dataset.samples)
    split_of: dict[str, set[str]] = {}
    for s in dataset.samples:
        split_of.setdefault(s.captions[0], set()).add(s.split)
    assert all(len(splits) == 1 for splits in split_of.values())  # a molecule's three drawings share a split
    assert len({next(iter(v)) for v in split_of.values()}) == 3


def test_a_tab_separated_table_lists_the_same_drawings_as_a_csv(tmp_path):
    rows = ["a,CCO,train,300,", "b,c1ccccc1,val,224,", "c,CC(=O)O,test,,7"]
    csv_samples = load_dataset(captions_file=write_table(tmp_path / "t.csv", rows)).samples
    tabbed = [r.replace(",", "\t") for r in rows]
    for name in ("t.tsv", "t.txt"):  # known by the suffix, or by a tab in the header
        table = write_table(tmp_path / name, tabbed, header="name\tsmiles\tsplit\tsize\taugment")
        samples = load_dataset(captions_file=table).samples
        assert [(s.image, s.captions, s.split) for s in samples] == [(s.image, s.captions, s.split) for s in csv_samples]
    assert [s.image.size for s in csv_samples] == [300, 224, 300] and csv_samples[2].image.augment == 7


@pytest.mark.parametrize("row, message", [
    ("a,CCO,train,abc,", "t.csv:2: size 'abc' is not a whole number in 32..2048"),
    ("a,CCO,train,100000,", "t.csv:2: size '100000' is not a whole number in 32..2048"),
    ("a,CCO,train,300,-1", "t.csv:2: augment '-1' is not a whole number in 0..18446744073709551615"),
    ("a,,train,300,", "t.csv:2: empty SMILES"),
    ('a,"CCO,train,300,', "t.csv:2: malformed CSV"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_line(tmp_path, row, message):
    with pytest.raises(CapcliError) as e:
        load_dataset(captions_file=write_table(tmp_path / "t.csv", [row]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_one_name_for_two_drawings_is_refused_and_a_repeated_row_dropped(tmp_path):
    table = write_table(tmp_path / "t.csv", ["a,CCO,train,300,", "a,CCO,train,300,", "b,CCN,train,300,"])
    assert [s.image.name for s in load_dataset(captions_file=table).samples] == ["a", "b"]
    with pytest.raises(CapcliError, match=r"t.csv:3: the name 'a' is given to two different drawings"):
        load_dataset(captions_file=write_table(tmp_path / "t.csv", ["a,CCO,train,300,", "a,CCN,train,300,"]))


def test_an_undrawable_smiles_is_a_bad_image_not_a_crash(tmp_path):
    good, bad = Drawing("good", "CCO"), Drawing("bad", "C1CC(")
    first, second = pixels([good, bad])
    assert first.shape == (96, 96, 3) and first.dtype == torch.uint8
    assert isinstance(second, ImageError) and "RDKit cannot parse the SMILES 'C1CC('" in str(second)


def test_without_rdkit_a_table_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rdkit", None)  # import rdkit now fails
    table = write_table(tmp_path / "molecules.csv", ["a,CCO,train,300,"])
    with pytest.raises(CapcliError, match=r"molecules.csv: drawing molecules needs RDKit: pip install 'capcli\[chem\]'"):
        load_dataset(tmp_path)
    assert table.is_file()


def test_varied_drawings_are_the_same_when_threads_draw_them_together():
    # RDKit's depictor choice is process-wide and varied drawings change it: threads must not interleave
    drawings = [Drawing(f"d{k}", smi, augment=1000 + k) for k, smi in enumerate(MOLECULES * 4)]
    alone = [np.asarray(d.render()) for d in drawings]
    together: dict[int, np.ndarray] = {}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns between any two Python lines, as on a busy machine

    def draw(part: int) -> None:
        for k in range(part, len(drawings), 4):
            together[k] = np.asarray(drawings[k].render())

    threads = [threading.Thread(target=draw, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert all(np.array_equal(alone[k], together[k]) for k in range(len(drawings)))


def test_the_feature_cache_knows_a_drawing_by_what_it_draws():
    cfg = ModelConfig(vocab_size=10)
    key = cache_key(cfg, "w", "fp32", [Drawing("a", "CCO")])
    assert key == cache_key(cfg, "w", "fp32", [Drawing("a", "CCO")])
    assert key != cache_key(cfg, "w", "fp32", [Drawing("a", "CCN")])  # same name, another molecule
    assert key != cache_key(cfg, "w", "fp32", [Drawing("a", "CCO", augment=3)])


def test_train_and_evaluate_on_a_table_of_drawings(tmp_path):
    rows = [f"m{k},{smi},{'val' if k % 6 == 0 else 'test' if k % 6 == 1 else 'train'},128,"
            for k, smi in enumerate(MOLECULES)] + [f"m{k}v,{smi},train,,{k}" for k, smi in enumerate(MOLECULES)]
    (tmp_path / "data").mkdir()
    write_table(tmp_path / "data" / "molecules.csv", rows)
    r = run_cli("train", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "run"), "--tokenizer", "smiles",
                "--epochs", "1", "--batch-size", "8", "--device", "cpu", *SMALL)
    assert r.exit_code == 0, r.stderr
    assert "data: molecules drawn on the fly (molecules.csv)" in r.stderr
    assert "cached features of 33 images" in r.stderr  # train 30 + val 3: every drawing encoded once
    saved = tmp_path / "results.jsonl"
    r = run_cli("evaluate", "-m", str(tmp_path / "run" / "best.safetensors"), "--data", str(tmp_path / "data"),
                "--split", "test", "--save", str(saved), "--json")
    assert r.exit_code == 0, r.stderr
    with open(saved) as f:
        names = sorted(line.split('"path": "')[1].split('"')[0] for line in f)
    assert names == sorted(f"m{k}" for k in range(len(MOLECULES)) if k % 6 == 1)
