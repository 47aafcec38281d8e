"""weights/average_models.py: the weights of several epochs of one run averaged into one model file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from capcli.model import files as model_files

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def test_average_models_averages_weights_and_records_its_sources(trained_model, tmp_path):
    loaded = model_files.load_model(trained_model)
    shifted = tmp_path / "shifted.safetensors"
    with torch.no_grad():
        for p in loaded.model.decoder.parameters():
            p.add_(1.0)
    model_files.save_model(shifted, loaded.model, loaded.vocab, encoder_weights=loaded.metadata["encoder_weights"],
                           training=loaded.training)
    out = tmp_path / "avg.safetensors"
    r = subprocess.run([sys.executable, str(WEIGHTS / "average_models.py"), str(out), str(trained_model), str(shifted)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    original = model_files.load_model(trained_model).model.state_dict()
    averaged = model_files.load_model(out)
    for name, t in averaged.model.state_dict().items():
        expected = original[name] + 0.5 if name.startswith("decoder.") and t.is_floating_point() else original[name]
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)
    assert averaged.training["averaged"] == [str(trained_model), str(shifted)]


def test_average_models_refuses_files_of_different_models(trained_model, tmp_path):
    loaded = model_files.load_model(trained_model)
    other = tmp_path / "other.safetensors"
    vocab = loaded.vocab
    vocab.words = vocab.words[:-1] + ["zebra"]
    model_files.save_model(other, loaded.model, vocab, encoder_weights=loaded.metadata["encoder_weights"])
    r = subprocess.run([sys.executable, str(WEIGHTS / "average_models.py"), str(tmp_path / "avg.safetensors"),
                        str(trained_model), str(other)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"{trained_model}: not the same model as {other}" in r.stderr
    assert not (tmp_path / "avg.safetensors").exists()
