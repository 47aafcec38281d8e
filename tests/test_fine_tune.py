"""Fine-tuning the encoder's top blocks over a cache of its frozen lower part (--fine-tune-blocks N):
the split is exact, the cached path gives the loss of the whole encoder, a stopped run resumes
bit for bit, only the top blocks learn, and a bad N is one line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from capcli.cli import app
from capcli.model import files as model_files
from capcli.model.encoders import Encoder
from capcli.train import loop
from capcli.train.config import TrainConfig
from capcli.train.feature_cache import cache_key
from capcli.train.features import CachedLowerOutputs, EncodedImages
from capcli.train.objective import TrainNet
from capcli.train.xe import CrossEntropy
from conftest import SMALL, cli_env, make_shapes_dataset

BASE = ["--batch-size", "16", "--lr", "3e-3", "--encoder-lr", "1e-3", "--min-freq", "1", "--split", "80/20/0",
        "--device", "cpu", "--save-every", "0", *SMALL]


def run_cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def few_shapes(tmp_path_factory):
    """The shapes data set with two images of each colour and shape (16): a few steps per epoch."""
    return make_shapes_dataset(tmp_path_factory.mktemp("few-shapes"), per_class=2)


def weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("name", ["lite0", "resnet50"])
def test_upper_of_lower_is_the_whole_encoder_at_every_split(name):
    torch.manual_seed(0)
    encoder = Encoder(name)  # random weights
    images = torch.randn(2, 3, 64, 64)
    whole = encoder(images)  # (2, L, D)
    for n in range(len(encoder.block_names) + 1):
        lower = encoder.lower(images, n)  # (2, C, h, w)
        assert lower.dim() == 4, n
        torch.testing.assert_close(encoder.upper(lower, n), whole, rtol=0, atol=0, msg=f"{n} blocks")
    assert encoder.lower(images, len(encoder.block_names)).shape == images.shape  # all blocks: the images


def test_trained_blocks_are_the_top_ones():
    encoder = Encoder("lite0")
    encoder.set_trained_blocks(2)
    trained = {n.split(".")[0] if not n.startswith("blocks.") else ".".join(n.split(".")[:2])
               for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    assert trained == {"conv_head", "bn2", "blocks.6"}
    encoder.set_fine_tune(True)  # --fine-tune-encoder's blocks: the head, blocks.6 and blocks.5
    assert encoder.trained_blocks == 3


def _trainer(data, out, blocks: int) -> loop.Trainer:
    cfg = TrainConfig(data=str(data), output=str(out), split="80/20/0", min_freq=1, batch_size=16, device="cpu",
                      precision="fp32", image_size=64, embed_dim=32, attention_dim=32, decoder_dim=64, dropout=0.1,
                      fine_tune_blocks=blocks)
    trainer = loop.Trainer(cfg)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("blocks", [1, 3])
def test_the_cached_lower_part_gives_the_loss_of_the_whole_encoder(tmp_path, few_shapes, blocks):
    trainer = _trainer(few_shapes, tmp_path / "run", blocks)
    assert isinstance(trainer.source, CachedLowerOutputs)
    trainer.net.train()
    xe = trainer.objectives["xe"]
    batch = xe.batches(torch.Generator().manual_seed(1))[0]
    torch.manual_seed(0)  # the same dropout both times
    cached, _ = xe.step(batch)
    paths = [s.image for s in trainer.train_samples + trainer.val_samples]
    whole = EncodedImages(trainer.model.encoder, paths, trainer.model.cfg, trainer.device, 1)
    run = dataclasses.replace(xe.run, net=TrainNet(trainer.model, whole.top_blocks), source=whole)
    torch.manual_seed(0)
    direct, _ = CrossEntropy(run, trainer.train_set).step(batch)
    torch.testing.assert_close(cached, direct, rtol=2e-3, atol=1e-4)  # the cache is fp16
    cached.backward()
    assert trainer.model.encoder.backbone.conv_head.weight.grad.abs().sum() > 0  # the top learns
    # A frozen cache and caches split at other blocks have other names
    mcfg = trainer.model.cfg
    keys = {cache_key(mcfg, trainer.weights_source, "fp32", paths, n) for n in (0, 1, 3)}
    assert len(keys) == 3 and cache_key(mcfg, trainer.weights_source, "fp32", paths, blocks) == trainer.source.cache.key


def test_a_run_stopped_mid_epoch_resumes_exactly(tmp_path, few_shapes, monkeypatch):
    args = ["--data", str(few_shapes), "--epochs", "2", "--fine-tune-blocks", "1", *BASE]
    straight = tmp_path / "straight"
    run_cli("train", "-o", str(straight), *args)

    run = tmp_path / "run"
    real_step = loop.Trainer._step

    def step_then_ctrl_c(self, objective, batch):
        real_step(self, objective, batch)
        if self.state.epoch == 1 and self.state.step_in_epoch == 2:  # epoch 2 of 2, step 2 of 5
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop.Trainer, "_step", step_then_ctrl_c)
    out = run_cli("train", "-o", str(run), *args, code=130)
    assert "interrupted in epoch 2 at step 2 by Ctrl-C" in out
    monkeypatch.setattr(loop.Trainer, "_step", real_step)
    run_cli("train", "--resume", str(run))
    a, b = weights(straight / "last.safetensors"), weights(run / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_only_the_top_blocks_learn_and_the_model_file_says_how_many(tmp_path, few_shapes):
    run = tmp_path / "run"
    run_cli("train", "--data", str(few_shapes), "-o", str(run), "--epochs", "1", "--fine-tune-blocks", "1", *BASE)
    loaded = model_files.load_model(run / "last.safetensors")
    trained = loaded.model.encoder.backbone.state_dict()
    fresh = Encoder("lite0")
    fresh.load_pretrained()
    start = fresh.backbone.state_dict()
    for top in ("conv_head.weight", "bn2.weight", "bn2.bias"):  # the head: the one block trained
        assert not torch.equal(trained[top], start[top]), top
    for key in start:
        if not key.startswith(("conv_head.", "bn2.")) or "running" in key:  # batch norm statistics stay frozen
            assert torch.equal(trained[key], start[key]), key
    assert loaded.training["fine_tune_blocks"] == 1
    assert json.loads((run / "config.json").read_text())["fine_tune_blocks"] == 1
    (cache,) = run.glob("features-*.f16")  # the output of blocks.6 at 64 px: (320, 2, 2) fp16 per image
    assert cache.stat().st_size == 16 * 320 * 2 * 2 * 2


@pytest.mark.parametrize("encoder, blocks, words", [
    ("lite0", "-1", "--fine-tune-blocks -1: give 0 (a frozen encoder) or more"),
    ("lite0", "10", "--fine-tune-blocks 10: the lite0 encoder has 9 blocks (top down: conv_head+bn2, blocks.6,"),
    ("resnet50", "6", "--fine-tune-blocks 6: the resnet50 encoder has 5 blocks"),
    ("timm:resnet18", "2", "--fine-tune-blocks 2: a timm encoder is not split into blocks"),
])
def test_a_bad_number_of_blocks_is_one_line_before_anything_is_read(tmp_path, encoder, blocks, words):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "no-such-data"), "-o", str(run),
                                      "--encoder", encoder, "--fine-tune-blocks", blocks])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"capcli: {words}") and len(result.stderr.splitlines()) == 1, result.stderr
    assert not run.exists()


def test_a_run_of_fine_tune_encoder_from_before_the_blocks_resumes(tmp_path, few_shapes):
    """A run folder whose config.json has fine_tune_encoder and no fine_tune_blocks: the whole encoder
    runs at every step as before (no cache), and config.json then records the three blocks it trains."""
    run = tmp_path / "run"
    run_cli("train", "--data", str(few_shapes), "-o", str(run), "--epochs", "1", "--fine-tune-encoder", *BASE)
    config = json.loads((run / "config.json").read_text())
    assert config["fine_tune_blocks"] == 3
    del config["fine_tune_blocks"]
    (run / "config.json").write_text(json.dumps(config))
    run_cli("train", "--resume", str(run), "--epochs", "2")
    assert json.loads((run / "config.json").read_text())["fine_tune_blocks"] == 3
    assert model_files.load_model(run / "last.safetensors").training["epochs"] == 2
    assert not list(run.glob("features-*"))


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_two_processes_share_the_cache_and_train_the_top_like_one(tmp_path, few_shapes):
    """torchrun, 2 gloo processes: each caches half of the lower part's outputs, the top blocks stay
    identical on both ranks after every step, and the epoch is one process's (to rounding)."""
    args = ["train", "--data", str(few_shapes), "--epochs", "1", "--fine-tune-blocks", "1", *BASE, "--dropout", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "capcli", *args, "-o", str(one)], capture_output=True, text=True,
                            env=cli_env(CAPCLI_DIST_TIMEOUT="60"), timeout=240)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "capcli"]
    run = subprocess.run([*torchrun, *args, "-o", str(two)], capture_output=True, text=True,
                         env=cli_env(CAPCLI_DEBUG_SYNC_CHECK="1"), timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "caching features of 16 images on 2 processes (8 each at most)" in run.stderr
    assert "sync check: the parameters of all 2 processes were identical after each of" in run.stderr
    (f1,), (f2,) = one.glob("features-*.f16"), two.glob("features-*.f16")
    assert f1.name == f2.name and f1.read_bytes() == f2.read_bytes()
    (m1,), (m2,) = ([json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two))
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    w1, w2 = weights(one / "last.safetensors"), weights(two / "last.safetensors")
    for k in w1:
        if w1[k].is_floating_point():  # not batch norm's step counts
            assert float((w2[k] - w1[k]).norm()) <= 1e-3 * float(w1[k].norm()) + 1e-6, k
