"""weights/ scripts: average_models.py averages the weights of several epochs of one run into one model
file; the shipped photo recipe (photo_recipe.sh) reaches capcli train whole; the molecule experiments
score in fp32 (molecule_scores.sh)."""

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


def test_the_shipped_photo_recipe_reaches_capcli_train_whole(tmp_path):
    # train_default_model.sh takes its options from photo_recipe.sh, which the photo experiments
    # share; a stand-in capcli records what it is given
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name in ("capcli", "python"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    r = subprocess.run(["bash", str(WEIGHTS / "train_default_model.sh"), "DATA", "RUN"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    train = log.read_text().splitlines()[0].split()
    assert train[:2] == ["capcli", "train"]
    options = dict(zip(train[2::2], train[3::2]))
    assert options == {"--data": "DATA", "-o": "RUN", "--split-ratios": "80/10/10", "--seed": "0", "--epochs": "25",
                       "--patience": "6", "--device": "cpu", "--lr": "1e-3", "--lr-patience": "3", "--batch-size": "64",
                       "--embed-dim": "128", "--attention-dim": "128", "--decoder-dim": "256", "--dropout": "0.3",
                       "--label-smoothing": "0.1"}
    assert len(train) == 2 + 2 * len(options)


def test_molecule_experiments_score_every_set_with_the_encoder_in_fp32(tmp_path):
    # molecule_scores.sh, which the molecule experiments source: four sets at beam 3,
    # the encoder in fp32 (auto would run int8 on CPUs with VNNI, for the shipped model only), one
    # TSV line each with the float scores; a stand-in capcli records its arguments and answers as
    # `capcli evaluate --json` does
    bin_dir, calls, scores = tmp_path / "bin", tmp_path / "calls", tmp_path / "scores.tsv"
    bin_dir.mkdir()
    (bin_dir / "capcli").write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n'
                                    'echo \'{"split": "test", "images": 3, "beam_size": 3, "runtime": "torch", '
                                    '"precision": "fp32", "valid": 0.5, "tanimoto": 0.25}\'\n')
    (bin_dir / "capcli").chmod(0o755)
    script = f'source "{WEIGHTS / "molecule_scores.sh"}" && score_molecules mine MODEL DATA "{scores}"'
    r = subprocess.run(["bash", "-c", script], env={"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    asked = [line.split() for line in calls.read_text().splitlines()]
    assert [(a[a.index("--captions") + 1], a[a.index("--split") + 1]) for a in asked] == [
        ("DATA/molecules.csv", "val"), ("DATA/molecules.csv", "test"),
        ("DATA/molecules_test_224.csv", "test"), ("DATA/molecules_test_500.csv", "test")]
    assert all(a[:1] == ["evaluate"] and a[a.index("--precision") + 1] == "fp32" and a[a.index("-k") + 1] == "3"
               and a[a.index("-m") + 1] == "MODEL" for a in asked)
    assert scores.read_text().splitlines() == [f"mine\t{table}\tvalid=0.5000\ttanimoto=0.2500" for table in
                                               ("molecules.csv:val", "molecules.csv:test",
                                                "molecules_test_224.csv:test", "molecules_test_500.csv:test")]
