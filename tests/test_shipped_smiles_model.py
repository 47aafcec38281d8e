"""The molecule reader shipped in weights/: found by its short name, complete, reads its examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.model import files as model_files
from capcli.infer.captioner import Captioner, default_model_path, model_path
from capcli.metrics.chemistry import rdkit_available
from capcli.cli import app
from capcli.errors import CapcliError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "weights" / "capcli-lite0-smiles.safetensors"
EXAMPLES = ROOT / "examples" / "molecules"


def examples() -> dict[str, str]:
    rows = [line.split(",", 1) for line in (EXAMPLES / "examples.csv").read_text().splitlines()[1:] if line]
    return {name: smiles for name, smiles in rows}


def test_short_names_pick_the_shipped_models(tmp_path, monkeypatch):
    monkeypatch.delenv("CAPCLI_MODEL", raising=False)
    assert model_path("smiles") == SHIPPED
    assert model_path("default") == model_path("captions") == model_path(None) == default_model_path()
    assert model_path("runs/x/best.safetensors") == Path("runs/x/best.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smiles").write_bytes(b"")  # a file of that name in the working folder wins
    assert model_path("smiles") == Path("smiles")


def test_a_missing_shipped_model_is_a_clear_error(monkeypatch):
    import capcli.infer.captioner as api

    monkeypatch.setitem(api.SHIPPED_MODELS, "smiles", "nothing-here.safetensors")
    with pytest.raises(CapcliError, match="shipped model nothing-here.safetensors not found"):
        model_path("smiles")


def test_it_is_small_fp16_and_says_what_it_reads():
    assert SHIPPED.stat().st_size < 25 * 2**20
    meta = model_files.read_metadata(SHIPPED)
    config, vocab, training = (json.loads(meta[k]) for k in ("config", "vocab", "training"))
    assert vocab["tokenizer"] == "smiles" and config["vocab_size"] == len(vocab["words"])
    assert config["image_size"] == 384 and config["encoder"] == "lite0"
    assert training["selection"] == "val_edit_similarity" and 0 < training["val_edit_similarity"] < 1
    assert {"Cl", "Br", "[nH]", "c", "1", "="} <= set(vocab["words"])
    from safetensors import safe_open

    with safe_open(str(SHIPPED), "pt") as f:
        assert all(f.get_slice(k).get_dtype() in ("F16", "I64") for k in f.keys())


def test_caption_model_smiles_reads_the_examples():
    expected = examples()
    paths = [str(EXAMPLES / name) for name in expected]
    result = CliRunner().invoke(app, ["caption", "--model", "smiles", "--format", "tsv", *paths])
    assert result.exit_code == 0, result.output
    read = dict(line.split("\t") for line in result.stdout.splitlines())
    assert list(read) == paths
    right = [name for name in expected if read[str(EXAMPLES / name)] == expected[name]]
    assert len(right) >= 2, read  # the README shows which it reads right
    cap = Captioner.load("smiles", "cpu")
    r = cap.caption(EXAMPLES / right[0])
    assert r.caption == "".join(r.tokens) and r.attention.shape == (len(r.tokens), 12, 12)


@pytest.mark.skipif(not rdkit_available(), reason="needs RDKit")
def test_beam_outputs_are_molecules():
    from rdkit import Chem

    cap = Captioner.load("smiles", "cpu")
    for r in cap.caption(sorted(EXAMPLES.glob("*.png")), beam_size=3, nbest=3):
        assert Chem.MolFromSmiles(r.caption) is not None, r.caption
