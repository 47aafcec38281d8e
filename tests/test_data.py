"""Dataset layouts -> Samples: what each layout yields, how images are split, what is skipped.

Every test builds its own tiny dataset in tmp_path (8x8 images), so none needs the network or
../shared/data; the one test on the real flickr8k-mini skips when that folder is absent.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from conftest import shape_image, warnings_of

from capcli.data.datasets import load_dataset, split_counts
from capcli.data.splits import SPLITS, hash_split, parse_split_ratios
from capcli.data.tables import read_caption_table
from capcli.errors import CapcliError

pytestmark = pytest.mark.usefixtures("capcli_log")  # caplog sees capcli's warnings


# --------------------------------------------------------------------------- helpers

def tiny_image(path: Path, colour=(200, 30, 30), size=(8, 8)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_csv(path: Path, rows, header=("image", "caption")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def by_name(samples):
    return {s.image.name: s for s in samples}


# --------------------------------------------------------------------------- Kaggle Flickr8k

@pytest.fixture
def kaggle(tmp_path) -> Path:
    root = tmp_path / "kaggle"
    rows = []
    for k in range(6):
        name = f"img{k}.jpg"
        tiny_image(root / "Images" / name)
        rows += [(name, f"caption {j} of image {k}") for j in range(5)]
    rows[0] = ("img0.jpg", "A dog, running, on grass .")  # quoted by csv.writer: holds commas
    rows[1] = ("img0.jpg", 'He said "hi", then left')  # doubled quotes inside a quoted field
    write_csv(root / "captions.txt", rows)
    return root


def test_kaggle_layout_samples_captions_and_quoted_commas(kaggle):
    samples = load_dataset(kaggle).samples
    assert len(samples) == 6
    assert all(len(s.captions) == 5 for s in samples)
    assert all(s.image.parent == kaggle / "Images" for s in samples)
    img0 = by_name(samples)["img0.jpg"]
    assert img0.captions[0] == "A dog, running, on grass ."  # not cut at the commas
    assert img0.captions[1] == 'He said "hi", then left'
    # No split of its own: the name-hash split, the same for every caption of an image.
    assert all(s.split == hash_split(s.image.name) for s in samples)
    assert len({s.image for s in samples}) == len(samples)


def test_kaggle_captions_file_on_disk_is_quoted(kaggle):
    # The fixture really exercises CSV quoting: the raw line holds the quoted caption.
    assert '"A dog, running, on grass ."' in (kaggle / "captions.txt").read_text()
    assert '"He said ""hi"", then left"' in (kaggle / "captions.txt").read_text()


def test_kaggle_lowercase_images_folder(tmp_path):
    root = tmp_path / "k"
    tiny_image(root / "images" / "a.png")
    write_csv(root / "captions.txt", [("a.png", "a red square")])
    (sample,) = load_dataset(root).samples
    assert sample.image == root / "images" / "a.png"
    assert sample.captions == ("a red square",)


# --------------------------------------------------------------------------- original Flickr8k

def make_flickr8k_original(root: Path, *, subfolder: bool, split_files: bool) -> Path:
    text = root / "Flickr8k_text" if subfolder else root
    text.mkdir(parents=True, exist_ok=True)
    names = [f"{1000 + k}_abc.jpg" for k in range(8)]
    for n in names[:7]:  # the last one is listed in the token file but not on disk
        tiny_image(root / "Flicker8k_Dataset" / n)
    lines = [f"{n}#{j}\t{'A' if j % 2 else 'a'} picture number {k} , take {j} ." for k, n in enumerate(names) for j in range(5)]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if split_files:
        (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[0:3]) + "\n")
        (text / "Flickr_8k.devImages.txt").write_text(names[3] + "\n")
        (text / "Flickr_8k.testImages.txt").write_text("\n".join([names[4], names[5], names[7]]) + "\n")
        # names[6] is on disk but in no split file: left out, as in the papers.
    return root


@pytest.mark.parametrize("subfolder", [False, True], ids=["text-at-root", "Flickr8k_text"])
def test_flickr8k_original_official_split(tmp_path, subfolder, caplog):
    root = make_flickr8k_original(tmp_path / "f8k", subfolder=subfolder, split_files=True)
    samples = load_dataset(root).samples
    got = {s.image.name: s.split for s in samples}
    assert got == {"1000_abc.jpg": "train", "1001_abc.jpg": "train", "1002_abc.jpg": "train",
                   "1003_abc.jpg": "val", "1004_abc.jpg": "test", "1005_abc.jpg": "test"}
    s = by_name(samples)["1004_abc.jpg"]
    assert s.captions == tuple(f"{'A' if j % 2 else 'a'} picture number 4 , take {j} ." for j in range(5))
    assert s.image.parent == root / "Flicker8k_Dataset"
    # 1007 is listed (test) but not on disk: its 5 captions are skipped with one warning.
    assert [m for m in warnings_of(caplog) if "not found on disk" in m] == [
        f"{root / 'Flickr8k_text' if subfolder else root}/Flickr8k.token.txt: skipped 5 captions of 1 image not found on disk"
    ]


def test_flickr8k_original_without_split_files_uses_hash_split(tmp_path):
    root = make_flickr8k_original(tmp_path / "f8k", subfolder=False, split_files=False)
    samples = load_dataset(root).samples
    assert len(samples) == 7  # all on-disk images, none left out
    assert all(len(s.captions) == 5 for s in samples)
    assert all(s.split == hash_split(s.image.name) for s in samples)


def test_flickr8k_token_line_without_tab_is_an_error_naming_the_line(tmp_path):
    root = tmp_path / "f8k"
    tiny_image(root / "Flicker8k_Dataset" / "a.jpg")
    (root / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\na.jpg#1 a cat without a tab\n")
    with pytest.raises(CapcliError) as e:
        load_dataset(root)
    assert str(e.value) == f"{root / 'Flickr8k.token.txt'}:2: expected 'name.jpg#N<TAB>caption'"


# --------------------------------------------------------------------------- Karpathy split JSON

def test_karpathy_json_own_split_and_restval(tmp_path):
    root = tmp_path / "karpathy"
    entries = []
    for k, split in enumerate(["train", "val", "test", "restval", "train"]):
        name = f"k{k}.jpg"
        tiny_image(root / "Images" / name)
        sentences = [{"raw": f"Raw caption {j} of {k}.", "tokens": ["ignored"]} for j in range(3)]
        entries.append({"filename": name, "filepath": "", "split": split, "sentences": sentences})
    entries[4]["sentences"] = [{"tokens": ["only", "tokens", "here"]}]  # no 'raw': joined tokens
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    samples = by_name(load_dataset(root).samples)
    assert {n: s.split for n, s in samples.items()} == {
        "k0.jpg": "train", "k1.jpg": "val", "k2.jpg": "test", "k3.jpg": "train", "k4.jpg": "train"}
    assert samples["k1.jpg"].captions == ("Raw caption 0 of 1.", "Raw caption 1 of 1.", "Raw caption 2 of 1.")
    assert samples["k4.jpg"].captions == ("only tokens here",)


def test_karpathy_coco_filepath(tmp_path):
    root = tmp_path / "coco-karpathy"
    tiny_image(root / "val2014" / "COCO_val2014_1.jpg")
    tiny_image(root / "train2014" / "COCO_train2014_2.jpg")
    data = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "split": "test", "sentences": [{"raw": "a cat"}]},
        {"filepath": "train2014", "filename": "COCO_train2014_2.jpg", "split": "restval", "sentences": [{"raw": "a dog"}]},
    ]}
    (root / "dataset_coco.json").write_text(json.dumps(data))
    samples = by_name(load_dataset(root).samples)
    assert samples["COCO_val2014_1.jpg"].image == root / "val2014" / "COCO_val2014_1.jpg"
    assert samples["COCO_val2014_1.jpg"].split == "test"
    assert samples["COCO_train2014_2.jpg"].split == "train"


def test_karpathy_entry_without_sentences_is_a_one_line_error(tmp_path):
    root = tmp_path / "k"
    tiny_image(root / "a.jpg")
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": ["a string"]}]}))
    with pytest.raises(CapcliError) as e:
        load_dataset(root)
    assert str(e.value).startswith(f"{root / 'dataset_flickr8k.json'}: images[0] lacks")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- COCO annotations

def test_coco_caption_annotations(tmp_path, caplog):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for stem, ids in (("train2014", (1, 2, 3)), ("val2014", tuple(range(10, 30)))):
        images = [{"id": i, "file_name": f"COCO_{stem}_{i:012d}.jpg"} for i in ids]
        for img in images:
            tiny_image(root / stem / img["file_name"])
        anns = [{"id": 100 * i + j, "image_id": i, "caption": f"image {i} caption {j}"} for i in ids for j in range(2)]
        anns.append({"id": 9999, "image_id": 424242, "caption": "an image nobody listed"})
        (root / "annotations" / f"captions_{stem}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    samples = load_dataset(root).samples
    assert len(samples) == 23
    assert all(len(s.captions) == 2 for s in samples)
    train = {s.image.name for s in samples if s.split == "train"}
    assert train == {f"COCO_train2014_{i:012d}.jpg" for i in (1, 2, 3)}
    val_file = [s for s in samples if "val2014" in s.image.name]
    assert all(s.image.parent == root / "val2014" for s in val_file)
    # The val file is cut in two by name hash: both halves non-empty over 20 images.
    assert {s.split for s in val_file} == {"val", "test"}
    assert sum("skipped 1 caption of unknown image ids" in m for m in warnings_of(caplog)) == 2


def test_coco_annotations_of_the_wrong_shape(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps({"images": [["not", "an", "object"]], "annotations": []}))
    with pytest.raises(CapcliError, match=r"captions_train2014.json: not a COCO captions file"):
        load_dataset(root)


# --------------------------------------------------------------------------- generic --captions --images

def test_generic_csv_with_split_column(tmp_path):
    images = tmp_path / "pics"
    for n in ("a.png", "b.png", "c.png", "d.png"):
        tiny_image(images / n)
    rows = [("a.png", "one", "train"), ("a.png", "two", "train"), ("b.png", "three", "VAL"),
            ("c.png", "four", "test"), ("d.png", "five", "validation")]
    captions = write_csv(tmp_path / "caps.csv", rows, header=("file_name", "text", "split"))
    samples = by_name(load_dataset(captions_file=captions, images_dir=images).samples)
    assert {n: s.split for n, s in samples.items()} == {"a.png": "train", "b.png": "val", "c.png": "test", "d.png": "val"}
    assert samples["a.png"].captions == ("one", "two")


def test_generic_tsv_and_jsonl(tmp_path):
    images = tmp_path / "pics"
    tiny_image(images / "a.png")
    tiny_image(images / "b.png")
    (tmp_path / "caps.tsv").write_text("image\tcaption\na.png\ta dog, running\nb.png\ta cat\n")
    samples = by_name(load_dataset(captions_file=tmp_path / "caps.tsv", images_dir=images).samples)
    assert samples["a.png"].captions == ("a dog, running",)
    lines = [{"image": "a.png", "caption": ["first", "second"]}, {"file_name": "b.png", "text": "third", "split": "test"}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples = by_name(load_dataset(captions_file=tmp_path / "caps.jsonl", images_dir=images).samples)
    assert samples["a.png"].captions == ("first", "second")
    assert samples["b.png"].split == "test"


def test_generic_images_default_to_the_caption_files_folder(tmp_path):
    tiny_image(tmp_path / "a.png")
    write_csv(tmp_path / "caps.csv", [("a.png", "a thing")])
    (sample,) = load_dataset(captions_file=tmp_path / "caps.csv").samples
    assert sample.image == tmp_path / "a.png"


def test_flickr_token_file_through_captions_option(tmp_path):
    # "name.jpg#N<TAB>caption" read as a generic TSV: the "#N" is not part of the file name.
    tiny_image(tmp_path / "pics" / "x.jpg")
    (tmp_path / "tokens.txt").write_text("x.jpg#0\ta dog\nx.jpg#1\ta brown dog\n")
    (sample,) = load_dataset(captions_file=tmp_path / "tokens.txt", images_dir=tmp_path / "pics").samples
    assert sample.captions == ("a dog", "a brown dog")


# --------------------------------------------------------------------------- splits

# Computed once; if the hash ever changed, a model evaluated after the change would find some of
# its training images in the test split. Never edit these values to make a test pass.
KNOWN_SPLITS = {"0.jpg": "train", "1.jpg": "train", "2.jpg": "train", "3.jpg": "train", "6.jpg": "val",
                "14.jpg": "test", "28.jpg": "val", "31.jpg": "val", "64.jpg": "test", "102.jpg": "test",
                "1000268201_693b08cb0e.jpg": "train"}


def test_hash_split_is_stable_across_runs_and_machines():
    assert {n: hash_split(n) for n in KNOWN_SPLITS} == KNOWN_SPLITS


def test_hash_split_depends_only_on_the_ratios_and_the_name():
    assert hash_split("6.jpg", (0.9, 0.05, 0.05)) == "val"
    assert hash_split("6.jpg", (1.0, 0.0, 0.0)) == "train"
    assert hash_split("14.jpg", (0.9, 0.1, 0.0)) == "val"  # no test split: the test images move to val


@pytest.mark.parametrize("ratios", [(0.9, 0.05, 0.05), (0.8, 0.2, 0.0), (0.5, 0.25, 0.25)])
def test_hash_split_ratios_roughly_respected(ratios):
    n = 2000
    counts = Counter(hash_split(f"{k:06d}_{k * 7919 % 1000}.jpg", ratios) for k in range(n))
    for split, r in zip(SPLITS, ratios):
        assert abs(counts[split] / n - r) < 0.03, (split, counts)
    if ratios[2] == 0:
        assert counts["test"] == 0


def test_hash_split_depends_on_the_name_not_the_folder(tmp_path):
    for folder in ("one", "two"):
        for k in range(30):
            tiny_image(tmp_path / folder / f"p{k}.png")
        write_csv(tmp_path / f"{folder}.csv", [(f"p{k}.png", f"c{k}") for k in range(30)])
    a = load_dataset(captions_file=tmp_path / "one.csv", images_dir=tmp_path / "one").samples
    b = load_dataset(captions_file=tmp_path / "two.csv", images_dir=tmp_path / "two").samples
    assert [(s.image.name, s.split) for s in a] == [(s.image.name, s.split) for s in b]


def test_configurable_split_keeps_all_captions_of_an_image_together(tmp_path):
    rows = []
    for k in range(60):
        tiny_image(tmp_path / "i" / f"{k}.png", size=(2, 2))
        rows += [(f"{k}.png", f"caption {j} for {k}") for j in range(3)]
    write_csv(tmp_path / "c.csv", rows)
    samples = load_dataset(captions_file=tmp_path / "c.csv", images_dir=tmp_path / "i",
                           split_ratios=parse_split_ratios("50/50/0")).samples
    assert len(samples) == 60 and all(len(s.captions) == 3 for s in samples)
    assert len({s.image for s in samples}) == 60  # each image once: its captions stay together
    counts = split_counts(samples)
    assert counts["test"] == 0 and counts["train"] > 10 and counts["val"] > 10
    assert all(s.split == hash_split(s.image.name, (0.5, 0.5, 0.0)) for s in samples)


@pytest.mark.parametrize("text,expected", [("90/5/5", (0.9, 0.05, 0.05)), ("0.8,0.2,0", (0.8, 0.2, 0.0)), ("8:1:1", (0.8, 0.1, 0.1))])
def test_parse_split_ratios(text, expected):
    assert parse_split_ratios(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["90/10", "a/b/c", "0/50/50", "-1/1/1", "", "0/0/0"])
def test_parse_split_ratios_refuses_nonsense(text):
    with pytest.raises(CapcliError, match=r"^--split-ratios .*: expected three numbers"):
        parse_split_ratios(text)


# --------------------------------------------------------------------------- missing data

def test_missing_images_skipped_with_one_warning_that_counts(tmp_path, caplog):
    tiny_image(tmp_path / "i" / "here.png")
    rows = [("here.png", "present")] + [(f"gone{k}.png", f"lost {j}") for k in range(3) for j in range(2)]
    write_csv(tmp_path / "c.csv", rows)
    with caplog.at_level(logging.WARNING, logger="capcli"):
        samples = load_dataset(captions_file=tmp_path / "c.csv", images_dir=tmp_path / "i").samples
    assert [s.image.name for s in samples] == ["here.png"]
    assert warnings_of(caplog) == [f"{tmp_path / 'c.csv'}: skipped 6 captions of 3 images not found on disk"]


def test_nothing_usable_is_a_one_line_error(tmp_path):
    (tmp_path / "i").mkdir()
    write_csv(tmp_path / "c.csv", [("gone.png", "lost"), ("gone2.png", "lost too")])
    with pytest.raises(CapcliError) as e:
        load_dataset(captions_file=tmp_path / "c.csv", images_dir=tmp_path / "i")
    assert str(e.value) == (f"{tmp_path / 'c.csv'}: no usable captions: none of the 2 images they name is on disk "
                            f"(looked for {tmp_path / 'i' / 'gone.png'} and the others in {tmp_path / 'i'}; "
                            f"--images DIR says where they are)")


def test_captions_without_images_say_where_they_looked_and_data_given_a_file(tmp_path):
    """--captions without --images looks beside the caption file, and says so when nothing is
    there; --data given a file said "data folder not found" for a file that exists."""
    (tmp_path / "pics").mkdir()
    shape_image("red", "square").save(tmp_path / "pics" / "a.png")
    write_csv(tmp_path / "c.csv", [("a.png", "a red square")])
    with pytest.raises(CapcliError, match=r"looked for .*/a\.png and the others in " + str(tmp_path) + ";"):
        load_dataset(captions_file=tmp_path / "c.csv")
    assert [s.image.name for s in load_dataset(captions_file=tmp_path / "c.csv", images_dir=tmp_path / "pics").samples] == ["a.png"]
    with pytest.raises(CapcliError) as e:
        load_dataset(tmp_path / "c.csv")
    assert str(e.value) == (f"{tmp_path / 'c.csv'}: is a file, --data takes a dataset folder (for a caption file: "
                            f"--captions FILE --images DIR)")


def test_kaggle_layout_with_no_images_is_an_error(tmp_path):
    (tmp_path / "Images").mkdir()
    write_csv(tmp_path / "captions.txt", [("a.jpg", "a caption")])
    with pytest.raises(CapcliError, match="no usable captions"):
        load_dataset(tmp_path)


def test_unknown_folder_layout_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CapcliError, match=r"empty: no dataset found \(expected captions.txt"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(CapcliError, match=r"nowhere: data folder not found"):
        load_dataset(tmp_path / "nowhere")
    write_csv(tmp_path / "c.csv", [("a.png", "x")])
    with pytest.raises(CapcliError, match=r"nopics: image folder not found"):
        load_dataset(captions_file=tmp_path / "c.csv", images_dir=tmp_path / "nopics")
    with pytest.raises(CapcliError, match=r"^give --data DIR"):
        load_dataset()


def test_read_caption_table_line_numbers(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('image,caption\n\na.png,"two\nlines"\nb.png,three\n')
    rows = read_caption_table(p)
    assert [(r.image, r.caption, r.line) for r in rows] == [("a.png", "two\nlines", 3), ("b.png", "three", 5)]


# --------------------------------------------------------------------------- the real mini set

def test_flickr8k_mini(mini_dir):
    samples = load_dataset(mini_dir).samples
    assert len(samples) == 800
    assert sum(len(s.captions) for s in samples) == 4000
    assert all(len(s.captions) == 5 for s in samples)
    counts = split_counts(samples)
    assert counts["train"] > 650 and counts["val"] > 10 and counts["test"] > 10
    assert all(s.split == hash_split(s.image.name) for s in samples)

