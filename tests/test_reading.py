"""End to end: a character model learns to read short words drawn with Pillow, and its attention
moves from left to right as it reads: the test that attention does its job."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from capcli.infer.captioner import Captioner
from capcli.cli import app
from capcli.text.vocab import UNK

ALPHABET = "AHOTXk"  # case kept: a char model must not lowercase
SIDE, SLOT = 192, 32  # 192 px -> a 6x6 Lite0 grid: letter k sits in grid column k


def word_image(word: str):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (SIDE, SIDE), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=30)
    for k, letter in enumerate(word):
        draw.text((SLOT * k + SLOT // 2, SIDE // 2), letter, fill="black", font=font, anchor="mm")
    return img


def make_words_dataset(root: Path, n: int = 240, seed: int = 0) -> dict[str, str]:
    """Kaggle layout, one caption per image: a 3-6 letter word. Returns {image name: word}."""
    rng = random.Random(seed)
    (root / "Images").mkdir(parents=True)
    words = {}
    for i in range(n):
        word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 6)))
        words[f"w{i:03d}.png"] = word
        word_image(word).save(root / "Images" / f"w{i:03d}.png")
    with open(root / "captions.txt", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(words.items())
    return words


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    words = make_words_dataset(root / "data")
    run = root / "run"
    result = CliRunner().invoke(app, [
        "-q", "train", "--data", str(root / "data"), "-o", str(run), "--tokenizer", "char", "--split", "85/15/0",
        "--image-size", str(SIDE), "--embed-dim", "32", "--attention-dim", "64", "--decoder-dim", "128",
        "--dropout", "0.1", "--epochs", "25", "--batch-size", "16", "--lr", "3e-3", "--patience", "25",
        "--device", "cpu", "--save-every", "0"])
    assert result.exit_code == 0, result.output
    return Captioner.load(run / "best.safetensors", "cpu"), root / "data", words


@pytest.mark.slow
def test_a_char_model_reads_words_left_to_right(reader):
    captioner, data, words = reader
    assert captioner.vocab.tokenizer == "char"
    assert set(captioner.vocab.words[4:]) == set(ALPHABET)  # every letter kept, none lowercased
    names = sorted(words)
    results = captioner.caption([data / "Images" / n for n in names])
    exact = sum(r.caption == words[n] for n, r in zip(names, results)) / len(names)
    assert exact > 0.5, exact
    in_order = pairs = 0
    for n, r in zip(names, results):
        assert set(r.caption) <= set(ALPHABET) and r.tokens == list(r.caption)  # joined without spaces
        att = r.attention  # (T, 6, 6)
        assert att.shape[1:] == (6, 6)
        column_mass = att.sum(dim=1)  # (T, 6): attention per grid column
        centre = (column_mass * torch.arange(6.0)).sum(1) / column_mass.sum(1)  # (T,) x of each token's look
        reads = min(len(words[n]), len(r.tokens))
        pairs += reads - 1
        in_order += int((centre[1:reads] > centre[:reads - 1]).sum())
    assert in_order / pairs > 0.8, (in_order, pairs)


@pytest.mark.slow
def test_char_models_never_write_unk(reader):
    captioner, data, words = reader
    blank = word_image("")  # nothing to read: the model still writes only letters of its alphabet
    for options in ({"beam_size": 1}, {"beam_size": 3, "nbest": 3}):
        r = captioner.caption(blank, **options)
        for hyp in [r, *r.alternatives]:
            assert set(hyp.caption) <= set(ALPHABET)
    features = captioner.encode(torch.rand(4, 3, SIDE, SIDE))
    from capcli.infer.decode import DecodeOptions

    for hyps in captioner.decode(features, DecodeOptions(beam_size=3, nbest=2)):
        assert all(UNK not in h.tokens for h in hyps)
