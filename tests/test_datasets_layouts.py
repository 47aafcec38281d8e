"""What load_dataset reports about the data it found, and the splits it makes of each layout.

The layouts' samples themselves are tested in test_data.py; here: Dataset's layout, split source,
counts and dropped images, the one info line, COCO with two years, Flickr8k with some of its split
files, and evaluate's warning when a model is scored on a split it was not trained with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import warnings_of
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.datasets import Dataset, load_dataset, split_mismatch
from capcli.data.splits import hash_split, parse_split_ratios

pytestmark = pytest.mark.usefixtures("capcli_log")  # caplog sees capcli's log lines


def tiny_image(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return path


def infos_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "capcli" and r.levelno == logging.INFO]


def load(caplog, *args, **kwargs) -> Dataset:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="capcli"):
        return load_dataset(*args, **kwargs)


# --------------------------------------------------------------------------- the report

def test_kaggle_dataset_reports_layout_split_counts_and_drops_in_one_info_line(tmp_path, caplog):
    root = tmp_path / "kaggle"
    rows = ["image,caption"]
    for k in range(10):
        tiny_image(root / "Images" / f"{k}.jpg")
        rows += [f"{k}.jpg,a picture of {k}", f"{k}.jpg,a picture of {k}"]  # the second: a duplicate
    rows += ["gone.jpg,an image that is not there"]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    dataset = load(caplog, root)
    assert dataset.layout == "Kaggle Flickr8k (captions.txt + Images/)"
    assert dataset.split_source == "hash 90/5/5 of image names"
    assert dataset.hashed == 10
    counts = dataset.counts()
    assert counts == {s: sum(hash_split(f"{k}.jpg") == s for k in range(10)) for s in ("train", "val", "test")}
    assert dataset.dropped == ["10 duplicate captions", "1 caption of 1 image not found on disk"]
    assert infos_of(caplog) == [
        f"data: Kaggle Flickr8k (captions.txt + Images/); split from hash 90/5/5 of image names; 10 images: "
        f"train {counts['train']}, val {counts['val']}, test {counts['test']}; "
        f"dropped 10 duplicate captions, 1 caption of 1 image not found on disk"
    ]


def test_caption_file_split_column_mixed_with_hash_says_so(tmp_path, caplog):
    for n in ("a.png", "b.png", "c.png"):
        tiny_image(tmp_path / n)
    (tmp_path / "caps.csv").write_text("image,caption,split\na.png,one,train\nb.png,two,test\nc.png,three,\n")
    dataset = load(caplog, captions_file=tmp_path / "caps.csv")
    assert dataset.layout == "caption file caps.csv"
    assert dataset.split_source == "the file's split column; images without one: hash 90/5/5 of image names"
    assert dataset.hashed == 1 and dataset.dropped == []
    (tmp_path / "all.csv").write_text("image,caption,split\na.png,one,train\nb.png,two,test\n")
    dataset = load(caplog, captions_file=tmp_path / "all.csv", split_ratios=parse_split_ratios("50/50/0"))
    assert dataset.split_source == "the file's split column" and dataset.hashed == 0
    # The ratios were given but every image has its own split: say that they are not used.
    assert warnings_of(caplog) == [f"{tmp_path / 'all.csv'}: split ratios 50/50/0 not used: the split comes from the file's split column"]


def test_karpathy_split_source(tmp_path, caplog):
    tiny_image(tmp_path / "Images" / "a.jpg")
    entries = [{"filename": "a.jpg", "split": "restval", "sentences": [{"raw": "a dog"}]}]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    dataset = load(caplog, tmp_path)
    assert (dataset.layout, dataset.split_source) == ("Karpathy split (dataset_flickr8k.json)", "the Karpathy split in dataset_flickr8k.json")
    assert infos_of(caplog) == ["data: Karpathy split (dataset_flickr8k.json); split from the Karpathy split in "
                                "dataset_flickr8k.json; 1 image: train 1, val 0, test 0"]


# --------------------------------------------------------------------------- COCO

def write_coco(root: Path, stem: str, names: list[str]) -> None:
    images = [{"id": i, "file_name": name} for i, name in enumerate(names)]
    for name in names:
        tiny_image(root / stem / name)
    anns = [{"id": i, "image_id": i, "caption": f"caption of {name}"} for i, name in enumerate(names)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{stem}.json").write_text(json.dumps({"images": images, "annotations": anns}))


def test_coco_2014_and_2017_together_use_2014_only(tmp_path, caplog):
    root = tmp_path / "coco"
    write_coco(root, "train2014", ["COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"])
    write_coco(root, "val2014", ["COCO_val2014_000000000003.jpg", "COCO_val2014_000000000004.jpg"])
    # train2017 = train2014 + most of val2014 (under new names): image 3 would be trained on.
    write_coco(root, "train2017", ["000000000001.jpg", "000000000002.jpg", "000000000003.jpg"])
    write_coco(root, "val2017", ["000000000004.jpg"])
    dataset = load(caplog, root)
    assert sorted(s.image.name for s in dataset.samples) == [
        "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg",
        "COCO_val2014_000000000003.jpg", "COCO_val2014_000000000004.jpg"]
    assert all(s.split == "train" for s in dataset.samples if "train2014" in s.image.name)
    assert all(s.split in ("val", "test") for s in dataset.samples if "val2014" in s.image.name)
    assert dataset.layout == "COCO 2014 annotations"
    assert dataset.split_source == "COCO: train2014 -> train, val2014 -> half val / half test by name hash"
    assert warnings_of(caplog) == [
        f"{root / 'annotations'}: both COCO 2014 and 2017 captions found; using 2014 only, as Karpathy's split and "
        f"most captioning papers do (2017's train set holds 2014's val images, which would leak into training); "
        f"remove one year's files to choose"]


def test_coco_2017_alone_is_used_without_a_warning(tmp_path, caplog):
    root = tmp_path / "coco"
    write_coco(root, "train2017", ["000000000001.jpg", "000000000002.jpg"])
    write_coco(root, "val2017", ["000000000004.jpg"])
    dataset = load(caplog, root)
    assert len(dataset.samples) == 3 and dataset.layout == "COCO 2017 annotations"
    assert warnings_of(caplog) == []


# --------------------------------------------------------------------------- original Flickr8k

NAMES = [f"{1000 + k}_abc.jpg" for k in range(40)]


def make_flickr8k(root: Path, split_files: dict[str, list[str]]) -> Path:
    for name in NAMES:
        tiny_image(root / "Flicker8k_Dataset" / name)
    lines = [f"{name}#{j}\tpicture {name} take {j}" for name in NAMES for j in range(2)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for file, names in split_files.items():
        (root / file).write_text("\n".join(names) + "\n")
    return root


def test_flickr8k_all_split_files_leave_unlisted_images_out_and_count_them(tmp_path, caplog):
    root = make_flickr8k(tmp_path / "f8k", {"Flickr_8k.trainImages.txt": NAMES[:20], "Flickr_8k.devImages.txt": NAMES[20:25],
                                            "Flickr_8k.testImages.txt": NAMES[25:30] + ["9999_gone.jpg", "9998_gone.jpg"]})
    dataset = load(caplog, root)
    assert dataset.counts() == {"train": 20, "val": 5, "test": 5}  # NAMES[30:] are in no split file
    assert dataset.layout == "original Flickr8k (Flickr8k.token.txt + Flicker8k_Dataset/)"
    assert dataset.split_source == "the official split files Flickr_8k.{train,dev,test}Images.txt"
    assert dataset.dropped == ["10 images in no split file"]
    assert warnings_of(caplog) == [
        f"{root / 'Flicker8k_Dataset'}: 2 images named in the split files are not on disk (first: 9999_gone.jpg, in Flickr_8k.testImages.txt)",
        f"{root / 'Flickr8k.token.txt'}: left out 10 images that no split file lists (as in the papers)",
    ]
    assert infos_of(caplog) == [
        "data: original Flickr8k (Flickr8k.token.txt + Flicker8k_Dataset/); split from the official split files "
        "Flickr_8k.{train,dev,test}Images.txt; 30 images: train 20, val 5, test 5; dropped 10 images in no split file"]


def test_flickr8k_only_the_test_file_sends_the_other_images_to_train_and_val_by_hash(tmp_path, caplog):
    root = make_flickr8k(tmp_path / "f8k", {"Flickr_8k.testImages.txt": NAMES[:5]})
    dataset = load(caplog, root)
    got = {s.image.name: s.split for s in dataset.samples}
    assert len(got) == 40 and all(got[n] == "test" for n in NAMES[:5])
    # 90/5/5 restricted to the splits without a file: train and val by 90:5.
    assert all(got[n] == hash_split(n, (0.9 / 0.95, 0.05 / 0.95, 0.0)) for n in NAMES[5:])
    assert dataset.counts()["train"] > 25 and dataset.hashed == 35
    assert dataset.split_source == ("the official split file Flickr_8k.testImages.txt; images in none of them: "
                                    "hash 90:5 of image names into train/val")
    assert warnings_of(caplog) == [] and dataset.dropped == []


def test_flickr8k_train_and_val_files_with_no_test_ratio_leave_the_rest_out(tmp_path, caplog):
    root = make_flickr8k(tmp_path / "f8k", {"Flickr_8k.trainImages.txt": NAMES[:30], "Flickr_8k.devImages.txt": NAMES[30:35]})
    dataset = load(caplog, root, split_ratios=parse_split_ratios("80/20/0"))
    assert dataset.counts() == {"train": 30, "val": 5, "test": 0}
    assert dataset.split_source == "the official split files Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt"
    assert dataset.dropped == ["5 images in no split file"]
    dataset = load(caplog, root)  # 90/5/5: the 5 unlisted images go to test
    assert dataset.counts() == {"train": 30, "val": 5, "test": 5}


def test_flickr8k_split_ratios_that_the_split_files_overrule_get_a_warning(tmp_path, caplog):
    files = {"Flickr_8k.trainImages.txt": NAMES[:30], "Flickr_8k.devImages.txt": NAMES[30:35], "Flickr_8k.testImages.txt": NAMES[35:]}
    root = make_flickr8k(tmp_path / "f8k", files)
    load(caplog, root)
    assert warnings_of(caplog) == []  # no ratios given
    load(caplog, root, split_ratios=parse_split_ratios("90/5/5"))
    assert warnings_of(caplog) == []  # the default ratios: nothing unexpected
    dataset = load(caplog, root, split_ratios=parse_split_ratios("80/10/10"))
    assert dataset.counts() == {"train": 30, "val": 5, "test": 5}
    assert warnings_of(caplog) == [f"{root}: split ratios 80/10/10 not used: the split comes from the official split "
                                   "files Flickr_8k.{train,dev,test}Images.txt"]


# --------------------------------------------------------------------------- evaluating on another split

def dataset_with(split_source: str, hashed: int = 0) -> Dataset:
    return Dataset([], "test layout", split_source, hashed)


def test_split_mismatch_compares_the_recorded_split_source():
    trained = {"split": "80/20/0", "split_source": "hash 80/20/0 of image names"}
    assert split_mismatch(trained, dataset_with("hash 80/20/0 of image names", 5), (0.8, 0.2, 0.0)) is None
    assert split_mismatch(trained, dataset_with("hash 50/50/0 of image names", 5), (0.5, 0.5, 0.0)) == "hash 80/20/0 of image names"
    assert split_mismatch(trained, dataset_with("the Karpathy split in dataset_coco.json"), None) == "hash 80/20/0 of image names"


def test_split_mismatch_with_older_model_files():
    # Only the ratios recorded: compared where they decide the split.
    old = {"split": "80/10/10"}
    assert split_mismatch(old, dataset_with("hash 80/10/10 of image names", 5), parse_split_ratios("80/10/10")) is None
    assert split_mismatch(old, dataset_with("hash 90/5/5 of image names", 5), None) == "hash 80/10/10 of image names"
    assert split_mismatch(old, dataset_with("the file's split column"), parse_split_ratios("80/10/10")) is None
    # Nothing recorded: nothing to trust.
    assert split_mismatch({}, dataset_with("hash 90/5/5 of image names", 5), None) == "a source the model file does not record"


def test_evaluate_warns_when_the_split_differs_from_the_models(trained_model, shapes_dir, no_java):
    # trained_model: --split 80/20/0 on the shapes (no split of their own).
    args = ["evaluate", "--data", str(shapes_dir), "-m", str(trained_model), "--split", "val", "--limit", "2", "--json",
            "--device", "cpu"]
    same = CliRunner().invoke(app, args)
    assert same.exit_code == 0, same.output
    assert "inflated" not in same.stderr
    other = CliRunner().invoke(app, [*args, "--split-ratios", "50/50/0"])
    assert other.exit_code == 0, other.output
    assert (f"capcli: warning: {trained_model}: trained on a split from hash 80/20/0 of image names; this evaluation's "
            f"val split comes from hash 50/50/0 of image names: its images may have been in training, scores may be "
            f"inflated") in other.stderr.splitlines()
