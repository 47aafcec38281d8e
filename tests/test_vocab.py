"""Tokenizer, vocabulary, and `capcli build-vocab` (counted on the train split only)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.splits import hash_split
from capcli.errors import CapcliError
from capcli.text.vocab import END, PAD, SPECIALS, START, UNK, Vocab, tokenize


def tiny_image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 120, 200)).save(path)


# --------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("text,words", [
    ("A dog, running.", ["a", "dog", "running"]),
    ("  The DOG'S ball !", ["the", "dog's", "ball"]),
    ("two-tone t-shirt", ["two", "tone", "t", "shirt"]),
    ("Café au lait 2 cups", ["café", "au", "lait", "2", "cups"]),
    ('"quoted" (words) ; ...', ["quoted", "words"]),
    ("under_score", ["under", "score"]),
    ("", []),
])
def test_tokenize(text, words):
    assert tokenize(text) == words


# --------------------------------------------------------------------------- Vocab

CAPTIONS = ["a dog runs .", "A dog sits.", "a cat sits", "the dog , a cat"]


def test_build_keeps_frequent_words_specials_first():
    v = Vocab.build(CAPTIONS, min_freq=2)
    assert v.words[:4] == list(SPECIALS)
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    # Most frequent first (a: 4, dog: 3), ties alphabetical (cat, sits: 2); once-only words dropped.
    assert v.words[4:] == ["a", "dog", "cat", "sits"]
    assert v.counts == {"a": 4, "dog": 3, "runs": 1, "sits": 2, "cat": 2, "the": 1}
    assert len(v) == 8


def test_encode_decode_round_trip_and_unk():
    v = Vocab.build(CAPTIONS, min_freq=1)
    ids = v.encode("A dog, sits.")
    assert ids[0] == START and ids[-1] == END
    assert [v.words[i] for i in ids[1:-1]] == ["a", "dog", "sits"]
    assert v.decode(ids) == "a dog sits"
    assert v.decode_ids(ids) == ["a", "dog", "sits"]
    unk = v.encode("a zebra sits")
    assert unk == [START, v.index["a"], UNK, v.index["sits"], END]
    assert v.decode(unk) == "a sits"  # <unk> is a special: not printed
    assert v.decode([v.index["dog"], END, v.index["cat"]]) == "dog"  # stops at <end>
    assert v.decode([PAD, START, v.index["cat"], PAD]) == "cat"


def test_coverage():
    v = Vocab.build(CAPTIONS, min_freq=2)
    assert v.coverage(["a dog", "a zebra"]) == pytest.approx(3 / 4)
    assert v.coverage([]) == 0.0


def test_save_load_round_trip(tmp_path):
    v = Vocab.build(CAPTIONS + ["ünïcode wörds wörds"], min_freq=1, max_len=17)
    v.save(tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text(encoding="utf-8"))
    assert data["words"] == v.words and data["counts"]["wörds"] == 2
    assert data["min_freq"] == 1 and data["max_len"] == 17
    w = Vocab.load(tmp_path / "v.json")
    assert (w.words, w.counts, w.min_freq, w.max_len) == (v.words, v.counts, 1, 17)
    assert w.encode("a wörds zebra") == v.encode("a wörds zebra")


def test_load_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(CapcliError, match=r"missing.json: no such file$"):
        Vocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CapcliError, match=r"bad.json: invalid JSON \(Expecting property name enclosed in double quotes\)$"):
        Vocab.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CapcliError, match=r"list.json: not a capcli vocabulary"):
        Vocab.load(tmp_path / "list.json")
    (tmp_path / "order.json").write_text(json.dumps({"words": ["dog", "<pad>", "<start>", "<end>", "<unk>"]}))
    with pytest.raises(CapcliError, match=r"order.json: vocabulary must start with <pad> <start> <end> <unk>"):
        Vocab.load(tmp_path / "order.json")
    (tmp_path / "dup.json").write_text(json.dumps({"words": [*SPECIALS, "dog", "dog"]}))
    with pytest.raises(CapcliError, match=r"dup.json: vocabulary has duplicate words"):
        Vocab.load(tmp_path / "dup.json")


# --------------------------------------------------------------------------- build-vocab CLI

def make_split_dataset(root: Path) -> Path:
    """A generic CSV with its own split column; some words appear only in val or test captions."""
    rows = []
    for k in range(6):
        tiny_image(root / f"t{k}.png")
        rows += [(f"t{k}.png", "a red square on a table", "train"), (f"t{k}.png", "a blue square", "train")]
    tiny_image(root / "v.png")
    rows += [("v.png", "a giraffe near a square", "val"), ("v.png", "giraffe giraffe giraffe giraffe giraffe", "val")]
    tiny_image(root / "x.png")
    rows += [("x.png", "a zebra zebra zebra zebra zebra", "test"), ("x.png", "red zebra", "test")]
    with open(root / "caps.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption", "split"), *rows])
    return root / "caps.csv"


def test_build_vocab_counts_only_the_train_split(tmp_path):
    captions = make_split_dataset(tmp_path / "d")
    out = tmp_path / "vocab.json"
    result = CliRunner().invoke(app, ["build-vocab", "--captions", str(captions), "--min-freq", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["words"][:4] == list(SPECIALS)
    assert set(data["words"][4:]) == {"a", "red", "square", "on", "table", "blue"}
    assert "zebra" not in data["counts"] and "giraffe" not in data["counts"]  # no test/val leakage
    assert data["counts"]["square"] == 12 and data["counts"]["a"] == 18
    assert result.stdout.splitlines() == [
        "vocabulary: 10 word tokens (6 + 4 specials), min count 1",
        "length in tokens: median 6, 95th percentile 6, longest 6; --max-len 50 keeps 100.0%",
        "coverage: train 100.00%, val 30.00%",  # val: a, a, square known of 10 words
        f"wrote {out}",
    ]


def test_build_vocab_smiles_keeps_atoms_whole_and_reports_lengths(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    rows = [("m0.png", "CCl", "train"), ("m1.png", "c1cc[nH]c1", "train"), ("m2.png", "C%10CCCCCCCCC%10", "train"),
            ("m3.png", "CBr", "val")]
    for name, _, _ in rows:
        tiny_image(root / name)
    with open(root / "caps.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption", "split"), *rows])
    out = tmp_path / "vocab.json"
    result = CliRunner().invoke(app, ["build-vocab", "--captions", str(root / "caps.csv"), "--tokenizer", "smiles",
                                      "--max-len", "12", "-o", str(out)])
    assert result.exit_code == 0, result.output
    vocab = Vocab.load(out)
    assert vocab.tokenizer == "smiles" and vocab.min_freq == 1 and vocab.max_len == 12
    assert set(vocab.words[4:]) == {"C", "Cl", "c", "1", "[nH]", "%10"}
    assert result.stdout.splitlines()[:3] == [
        "vocabulary: 10 smiles tokens (6 + 4 specials), min count 1",
        "length in tokens: median 7, 95th percentile 7, longest 12; --max-len 12 keeps 100.0%",
        "coverage: train 100.00%, val 50.00%",  # CBr: C known, Br not
    ]


def test_build_vocab_with_hash_split_leaves_out_val_and_test_words(tmp_path):
    # Kaggle layout without a split: one unique word per image; only train images' words may appear.
    root = tmp_path / "k"
    rows = []
    for k in range(40):
        tiny_image(root / "Images" / f"{k}.jpg")
        rows += [(f"{k}.jpg", f"word{k} shared"), (f"{k}.jpg", f"word{k} also")]
    with open(root / "captions.txt", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    out = tmp_path / "v.json"
    result = CliRunner().invoke(app, ["build-vocab", "--data", str(root), "--min-freq", "2", "--split", "60/20/20", "-o", str(out)])
    assert result.exit_code == 0, result.output
    words = set(json.loads(out.read_text())["words"])
    held_out = {f"word{k}" for k in range(40) if hash_split(f"{k}.jpg", (0.6, 0.2, 0.2)) != "train"}
    train = {f"word{k}" for k in range(40)} - held_out
    assert held_out and train  # the split really has both sides here
    assert train <= words and not (held_out & words)
    assert Vocab.load(out).min_freq == 2


def test_build_vocab_min_freq_and_max_len_are_recorded(tmp_path):
    captions = make_split_dataset(tmp_path / "d")
    out = tmp_path / "vocab.json"
    result = CliRunner().invoke(app, ["build-vocab", "--captions", str(captions), "--min-freq", "7", "--max-len", "12", "-o", str(out)])
    assert result.exit_code == 0, result.output
    v = Vocab.load(out)
    assert v.words[4:] == ["a", "square"]  # a: 18, square: 12; red 6, blue 6 are below 7
    assert (v.min_freq, v.max_len) == (7, 12)
    assert "vocabulary: 6 word tokens (2 + 4 specials), min count 7" in result.stdout


def test_build_vocab_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["build-vocab", "--data", str(tmp_path / "empty"), "-o", str(tmp_path / "v.json")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"capcli: {tmp_path / 'empty'}: no dataset found")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "v.json").exists()
    # A dataset whose every image lands outside train: nothing to count.
    tiny_image(tmp_path / "p" / "a.png")
    with open(tmp_path / "p" / "c.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption", "split"), ("a.png", "a thing", "test")])
    result = CliRunner().invoke(app, ["build-vocab", "--captions", str(tmp_path / "p" / "c.csv"), "-o", str(tmp_path / "v.json")])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == f"capcli: {tmp_path / 'p' / 'c.csv'}: the train split has no captions"


def test_build_vocab_on_flickr8k_mini(mini_dir, tmp_path):
    out = tmp_path / "v.json"
    result = CliRunner().invoke(app, ["build-vocab", "--data", str(mini_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    v = Vocab.load(out)
    assert 300 < len(v) < 3000
    assert all(n >= 5 for w, n in v.counts.items() if w in v.index)
    assert "coverage: train 9" in result.stdout  # >90% of train words known at min count 5


@pytest.mark.parametrize("text", ["the dog\u2019s ball", "the dog\u2018s ball", "the dog\u02bcs ball", "\u2018the dog's ball\u2019"])
def test_typographic_apostrophes_are_plain_apostrophes(text):
    assert tokenize(text) == ["the", "dog's", "ball"]


def test_vocabulary_is_validated_without_assert(tmp_path):
    """python -O strips asserts: the checks must still refuse a vocabulary with a non-string word."""
    import subprocess
    import sys

    path = tmp_path / "v.json"
    path.write_text(json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", 5]}))
    code = ("import sys\nfrom capcli.errors import CapcliError\nfrom capcli.text.vocab import Vocab\n"
            "try:\n    Vocab.load(sys.argv[1])\nexcept CapcliError as e:\n    print(e.message)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{path}: not a capcli vocabulary (expected JSON with a 'words' list)"
