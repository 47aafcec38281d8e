"""Training runs: settings kept on --resume, learning-rate halving, unreadable images while
fine-tuning, Ctrl-C at an epoch's end, write order of checkpoints and metrics, curves.png."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from capcli.model import files as model_files
from capcli.train import state as train_state
from capcli.train import loop
from capcli.train import setup as train_setup
from capcli.cli import app
from capcli.train.schedule import plateau_step
from capcli.train.config import TrainConfig
from conftest import SMALL

BASE = ["--batch-size", "16", "--lr", "3e-3", "--min-freq", "1", "--split", "80/20/0", "--device", "cpu",
        "--save-every", "0", *SMALL]
FEW_STEPS = ["--batch-size", "120"]  # fine-tuning runs the encoder's backward pass: few, larger steps


def run_cli(*args: str, code: int = 0):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def one_bad_image(tmp_path, shapes_dir):
    """The shapes set with one image replaced by garbage: 1 of 48 images (2%) cannot be read."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "Images" / "red_square_0.png").write_bytes(b"not a png at all")
    return data


# ------------------------------------------------------------------ plateau: one count decides

def test_plateau_halves_after_every_lr_patience_bad_epochs_and_stops_at_patience():
    bad, seen = 0, []
    for improved in (True, False, False, False, False, True, False):
        bad, halve, stop = plateau_step(improved, bad, lr_patience=2, patience=4)
        seen.append((bad, halve, stop))
    assert seen == [(0, False, False), (1, False, False), (2, True, False), (3, False, False),
                    (4, True, True), (0, False, False), (1, False, False)]
    assert plateau_step(False, 0, lr_patience=1, patience=5) == (1, True, False)  # the first bad epoch
    assert plateau_step(False, 6, lr_patience=0, patience=9)[1] is False  # 0: never halve


def test_learning_rate_halves_right_after_each_epoch_without_gain(tmp_path, shapes_dir):
    run = tmp_path / "run"
    run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "5", "--lr-patience", "1",
            "--patience", "5", *BASE)
    m = metrics(run)
    assert m[0]["lr"] == pytest.approx(3e-3)
    for this, after in zip(m, m[1:]):
        assert after["lr"] == pytest.approx(this["lr"] * (1.0 if this["best"] else 0.5)), m


# ------------------------------------------------------------------ --resume keeps the run's settings

def test_resume_keeps_settings_applies_the_changeable_ones_and_refuses_others(tmp_path, one_bad_image):
    run = tmp_path / "run"
    run_cli("train", "--data", str(one_bad_image), "-o", str(run), "--epochs", "1", "--max-bad-fraction", "0.05",
            "--workers", "1", *BASE)
    # Before: the CLI defaults of --workers, --save-every and --max-bad-fraction replaced the run's,
    # and this resume failed on the unreadable image (2% > the default 1%).
    out = run_cli("train", "--resume", str(run), "--epochs", "2")
    assert "resume: --epochs 2 (the run had 1)" in out
    config = json.loads((run / "config.json").read_text())
    assert (config["epochs"], config["max_bad_fraction"], config["workers"], config["save_every"]) == (2, 0.05, 1, 0)
    assert [r["epoch"] for r in metrics(run)] == [1, 2]

    for option, value in (("--lr", "1e-2"), ("--data", str(one_bad_image)), ("--decoder-dim", "8")):
        out = run_cli("train", "--resume", str(run), "--epochs", "3", option, value, code=2)
        assert len(out.strip().splitlines()) == 1 and out.startswith(f"capcli: {option} cannot change when resuming"), out
    out = run_cli("train", "--resume", str(run), "-o", str(tmp_path / "other"), code=2)
    assert "not both" in out
    assert json.loads((run / "config.json").read_text())["epochs"] == 2  # nothing changed


def test_every_training_setting_is_a_cli_option_with_the_same_default():
    command = typer.main.get_command(app).commands["train"]
    params = {p.name: p for p in command.params}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in params, field.name
        default = params[field.name].default
        default = getattr(default, "value", default)
        expected = getattr(TrainConfig(), field.name)
        if field.name == "output":
            expected = None  # the run folder has no default on the command line
        assert default == expected, field.name


@pytest.mark.parametrize("option, value, words", [("--attention", "bahdanau", "Invalid value for '--attention'"),
                                                  ("--rnn", "transformer", "Invalid value for '--rnn'"),
                                                  ("--encoder", "vgg16", "unknown encoder")])
def test_bad_choices_are_refused_before_anything_is_read_or_written(tmp_path, option, value, words):
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(tmp_path / "no-such-data"), "-o", str(run), option, value, code=2)
    assert words in out
    assert not run.exists()


# ------------------------------------------------------------------ unreadable images while fine-tuning

def test_fine_tuning_skips_an_unreadable_image_and_counts_it(tmp_path, one_bad_image):
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(one_bad_image), "-o", str(run), "--epochs", "1", "--fine-tune-encoder",
                  "--max-bad-fraction", "0.05", *BASE, *FEW_STEPS)
    assert "skipping 1 unreadable image (first: " in out and "red_square_0.png" in out
    assert [r["epoch"] for r in metrics(run)] == [1]
    assert model_files.load_model(run / "last.safetensors").training["epochs"] == 1


def test_fine_tuning_stops_on_too_many_unreadable_images_after_saving_the_epoch(tmp_path, one_bad_image):
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(one_bad_image), "-o", str(run), "--epochs", "2", "--fine-tune-encoder",
                  *BASE, *FEW_STEPS, code=1)
    assert "1 of 48 images cannot be read (2.1%, more than the allowed 1.0%" in out
    assert "epoch 1 is saved: continue with capcli train --resume" in out
    assert model_files.load_model(run / "last.safetensors").training["epochs"] == 1
    # allowed now: the run goes on from epoch 1, and remembers the bad image without reading it again
    out = run_cli("train", "--resume", str(run), "--max-bad-fraction", "0.05")
    assert [r["epoch"] for r in metrics(run)] == [1, 2]


# ------------------------------------------------------------------ Ctrl-C

def test_ctrl_c_during_validation_finishes_the_epoch_then_stops(tmp_path, shapes_dir, monkeypatch):
    run = tmp_path / "run"
    real_validate = loop.Trainer.validate

    def validate_then_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)  # pressed while validation runs
        return real_validate(self)

    monkeypatch.setattr(loop.Trainer, "validate", validate_then_ctrl_c)
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "3", *BASE, code=130)
    assert f"interrupted after epoch 1 by Ctrl-C; saved {run / 'last.safetensors'}; continue with: capcli train --resume {run}" in out
    assert model_files.load_model(run / "last.safetensors").training["epochs"] == 1
    assert [r["epoch"] for r in metrics(run)] == [1]
    monkeypatch.setattr(loop.Trainer, "validate", real_validate)
    run_cli("train", "--resume", str(run))
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]


def test_ctrl_c_while_caching_features_says_how_to_continue(tmp_path, shapes_dir, monkeypatch):
    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_setup, "build_feature_cache", interrupted)
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "1", *BASE, code=130)
    assert f"interrupted by Ctrl-C while caching features; the images cached so far are kept; continue with: capcli train --resume {run}" in out


# ------------------------------------------------------------------ write order and metrics

def test_best_is_written_before_last(tmp_path, shapes_dir, monkeypatch):
    written = []
    real_save = model_files.save_model
    monkeypatch.setattr(model_files, "save_model", lambda path, *a, **k: written.append(path.name) or real_save(path, *a, **k))
    run_cli("train", "--data", str(shapes_dir), "-o", str(tmp_path / "run"), "--epochs", "2", *BASE)
    assert written[:2] == ["best.safetensors", "last.safetensors"]  # epoch 1 is always the best so far
    for k, name in enumerate(written):
        if name == "best.safetensors":
            assert written[k + 1] == "last.safetensors"


def test_an_epoch_replayed_after_a_crash_is_logged_once(tmp_path, shapes_dir, monkeypatch):
    run = tmp_path / "run"
    calls = []
    real_save_state = train_state.save_train_state

    def crash_on_second(path, state):
        calls.append(state["epoch"])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")  # epoch 2's checkpoint is never written
        return real_save_state(path, state)

    monkeypatch.setattr(train_state, "save_train_state", crash_on_second)
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "3", *BASE, code=1)
    assert "no space left on device" in out
    assert [r["epoch"] for r in metrics(run)] == [1]
    monkeypatch.setattr(train_state, "save_train_state", real_save_state)
    run_cli("train", "--resume", str(run))  # replays epoch 2
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]


def test_max_len_applies_with_a_given_vocabulary(tmp_path, shapes_dir):
    vocab = tmp_path / "vocab.json"
    run_cli("build-vocab", "--data", str(shapes_dir), "-o", str(vocab), "--min-freq", "1")
    assert json.loads(vocab.read_text())["max_len"] == 50
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "1", "--vocab", str(vocab),
                  "--max-len", "3", *BASE)
    assert json.loads((run / "vocab.json").read_text())["max_len"] == 3
    assert "captions longer than 3 tokens" in out
    assert model_files.load_model(run / "last.safetensors").training["train_captions"] < 5 * 48 * 0.8


def test_curves_png_follows_every_epoch(tmp_path, shapes_dir):
    run = tmp_path / "run"
    run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "2", *BASE)
    with Image.open(run / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 100
