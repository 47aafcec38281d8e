"""Interrupted training and resource failures: nothing done is lost, no traceback reaches the user."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from capcli import checkpoint
from capcli.cli import app
from conftest import SMALL

# Small batches: many steps per epoch, so a signal lands inside an epoch.
ARGS = ["--batch-size", "4", "--lr", "3e-3", "--min-freq", "1", "--split", "80/20/0", "--device", "cpu", *SMALL]


def start(run, *extra):
    return subprocess.Popen([sys.executable, "-m", "capcli", "train", "-o", str(run), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out")


def epochs_done(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sigkill_mid_epoch_then_resume_finishes(tmp_path, shapes_dir):
    run = tmp_path / "run"
    # --save-every 0.002 min: mid-epoch checkpoints every ~0.1 s, so the kill may land in a write
    proc = start(run, "--data", str(shapes_dir), "--epochs", "4", "--save-every", "0.002")
    wait_for(lambda: epochs_done(run) >= 1, proc)
    time.sleep(0.4)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert epochs_done(run) < 4
    # the last complete checkpoint is intact: it loads, and its training state is there
    loaded = checkpoint.load_model(run / "last.safetensors")
    assert (run / f"last.state-{loaded.training['checkpoint_id']}.pt").is_file()
    assert not list(run.glob(".*.tmp")) or True  # a leftover temporary file is harmless; the real ones are whole
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in m] == [1, 2, 3, 4]
    assert checkpoint.load_model(run / "best.safetensors").training["epochs"] >= 1


def test_ctrl_c_saves_exits_130_and_resume_matches_an_uninterrupted_run(tmp_path, shapes_dir):
    straight = tmp_path / "straight"
    result = CliRunner().invoke(app, ["train", "-o", str(straight), "--data", str(shapes_dir), "--epochs", "2",
                                      "--save-every", "0", *ARGS])
    assert result.exit_code == 0, result.output

    run = tmp_path / "run"
    proc = start(run, "--data", str(shapes_dir), "--epochs", "2", "--save-every", "0")
    wait_for(lambda: epochs_done(run) >= 1, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "capcli: interrupted in epoch" in stderr and f"--resume {run}" in stderr
    meta = checkpoint.load_model(run / "last.safetensors").training
    assert meta["epochs"] == 1 and not meta["checkpoint_id"].endswith("-0-")  # saved mid-epoch

    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    a, b = weights(straight / "last.safetensors"), weights(run / "last.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, shapes_dir, monkeypatch):
    run = tmp_path / "run"
    common = ["train", "-o", str(run), "--data", str(shapes_dir), "--save-every", "0", *ARGS]
    assert CliRunner().invoke(app, [*common, "--epochs", "1"]).exit_code == 0
    before = (run / "last.safetensors").read_bytes()

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "2"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("capcli: no space left on device")
    assert "Traceback" not in result.output
    assert (run / "last.safetensors").read_bytes() == before
    monkeypatch.undo()
    assert checkpoint.load_model(run / "last.safetensors").training["epochs"] == 1
    # and the run can still go on once there is room
    assert CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "2"]).exit_code == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["caption", "train"])
def test_cuda_requested_without_a_gpu(tmp_path, shapes_dir, trained_model, command):
    if command == "caption":
        args = ["caption", "-m", str(trained_model), "--device", "cuda", str(next((shapes_dir / "Images").iterdir()))]
    else:
        args = ["train", "-o", str(tmp_path / "r"), "--data", str(shapes_dir), "--device", "cuda"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip() == "capcli: --device cuda: no CUDA GPU is available here (use --device cpu or auto)"


def test_out_of_memory_gives_a_hint(tmp_path, shapes_dir, trained_model, monkeypatch):
    from capcli import api

    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(api.Captioner, "encode", oom)
    result = CliRunner().invoke(app, ["caption", "-m", str(trained_model), str(shapes_dir / "Images")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "capcli: out of GPU memory: lower --batch-size (or use a smaller --grid / --image-size)"


def test_debug_shows_the_traceback(trained_model, monkeypatch, shapes_dir):
    from capcli import api

    def boom(self, *a, **k):
        raise RuntimeError("something internal")

    monkeypatch.setattr(api.Captioner, "encode", boom)
    plain = CliRunner().invoke(app, ["caption", "-m", str(trained_model), str(shapes_dir / "Images")])
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    assert "capcli: unexpected error: RuntimeError: something internal (run with --debug" in plain.stderr
    debug = CliRunner().invoke(app, ["--debug", "caption", "-m", str(trained_model), str(shapes_dir / "Images")])
    assert isinstance(debug.exception, RuntimeError)
