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

from capcli.model import files as model_files
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
    loaded = model_files.load_model(run / "last.safetensors")
    assert (run / f"last.state-{loaded.training['checkpoint_id']}.pt").is_file()
    assert not list(run.glob(".*.tmp")) or True  # a leftover temporary file is harmless; the real ones are whole
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in m] == [1, 2, 3, 4]
    assert model_files.load_model(run / "best.safetensors").training["epochs"] >= 1


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shapes_dir):
    """Two epochs without interruption: what every interrupted and resumed run must end as."""
    straight = tmp_path_factory.mktemp("straight") / "run"
    result = CliRunner().invoke(app, ["train", "-o", str(straight), "--data", str(shapes_dir), "--epochs", "2",
                                      "--save-every", "0", *ARGS])
    assert result.exit_code == 0, result.output
    return straight


# SIGHUP takes SIGTERM's path (signals.StopSignals handles the three alike); its exit code is
# tested with captioning below.
@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stop_signal_saves_at_the_next_step_and_resume_matches_an_uninterrupted_run(tmp_path, shapes_dir, straight_run,
                                                                                     signum, code, name):
    """Ctrl-C, SIGTERM (SLURM, Kubernetes, timeout) and SIGHUP (a closed terminal) mid-epoch: a
    checkpoint is written after the signal, at a step boundary; exit 128 + the signal; no temporary
    files left; --resume ends bit-identical to a run never stopped. (SIGTERM and SIGHUP killed the
    run on the spot before: nothing saved since the last epoch.)"""
    run = tmp_path / "run"
    proc = start(run, "--data", str(shapes_dir), "--epochs", "2", "--save-every", "0")
    wait_for(lambda: epochs_done(run) >= 1, proc)
    time.sleep(0.3)
    signalled = time.time()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("capcli: interrupted in epoch 2 at step "), stderr
    assert f" by {name}; saved {run / 'last.safetensors'}; continue with: capcli train --resume {run}" in last_line
    meta = model_files.load_model(run / "last.safetensors").training
    assert meta["epochs"] == 1 and not meta["checkpoint_id"].startswith("1-0-")  # saved mid-epoch 2...
    assert (run / "last.safetensors").stat().st_mtime >= signalled  # ...after the signal
    assert not list(run.glob(".*.tmp")) and len(list(run.glob("last.state-*.pt"))) == 1

    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    a, b = weights(straight_run / "last.safetensors"), weights(run / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_sigterm_while_caching_features_keeps_what_was_cached(tmp_path, shapes_dir, monkeypatch):
    """SIGTERM in the middle of the feature cache: exit 143, the rows cached so far are recorded,
    and --resume encodes only the rest."""
    import os

    from capcli.train import feature_cache

    run = tmp_path / "run"
    real_normalize, batches = feature_cache.model_input, []

    def normalize_then_sigterm(*a, **k):
        batches.append(1)
        if len(batches) == 3:  # the third batch of 4 images: two are cached
            os.kill(os.getpid(), signal.SIGTERM)
        return real_normalize(*a, **k)

    monkeypatch.setattr(feature_cache, "model_input", normalize_then_sigterm)
    result = CliRunner().invoke(app, ["train", "-o", str(run), "--data", str(shapes_dir), "--epochs", "1", *ARGS])
    assert result.exit_code == 143, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"capcli: interrupted by SIGTERM while caching features; the images cached so far are kept; "
        f"continue with: capcli train --resume {run}")
    (record,) = run.glob("features-*.json")
    cached = json.loads(record.read_text())["done"]
    assert 8 <= cached < 48
    monkeypatch.setattr(feature_cache, "model_input", real_normalize)
    encoded = []
    monkeypatch.setattr(feature_cache.FeatureCache, "write_rows",
                        lambda self, fd, rows, f, real=feature_cache.FeatureCache.write_rows: encoded.extend(rows) or real(self, fd, rows, f))
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert min(encoded) >= cached and len(encoded) == 48 - cached


def test_resume_without_last_checkpoint_refuses_instead_of_starting_over(tmp_path, shapes_dir):
    """A run folder that lost last.safetensors (but has saved epochs) started over before, silently
    overwriting best.safetensors and metrics.jsonl."""
    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", "-o", str(run), "--data", str(shapes_dir), "--epochs", "1",
                                    "--save-every", "0", *ARGS]).exit_code == 0
    (run / "last.safetensors").unlink()
    best, metrics = (run / "best.safetensors").read_bytes(), (run / "metrics.jsonl").read_bytes()
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"capcli: {run / 'last.safetensors'}: missing, but the run has saved epochs (best.safetensors and "
        f"metrics.jsonl): it cannot resume; start a new run with -o (or --init {run / 'best.safetensors'} to start "
        f"from its best model)")
    assert (run / "best.safetensors").read_bytes() == best and (run / "metrics.jsonl").read_bytes() == metrics


# ------------------------------------------------------------------ full and read-only disks

@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 96 MB (tmpfs), so that the disk fills for real (CI runs as root)."""

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave: int):
    """Take all the free space of ``disk`` but ``leave`` bytes."""
    import os

    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = max(free - leave, 0)
        while todo > 0:
            todo -= f.write(chunk[:min(len(chunk), todo)])


@pytest.mark.parametrize("room", ["none", "for the training state"])
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(small_disk, shapes_dir, room):
    """A real full disk: torch.save and safetensors raised their own errors ("[enforce fail at
    inline_container.cc ...]", SafetensorError) and capcli said "unexpected error". Now: one line
    saying the disk is full and how to go on, exit 1, the previous checkpoint whole, nothing left
    behind; once there is room, --resume goes on."""
    run = small_disk / "run"
    started = CliRunner().invoke(app, ["train", "-o", str(run), "--data", str(shapes_dir), "--epochs", "1",
                                       "--save-every", "0", *ARGS])
    assert started.exit_code == 0, started.output
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (state,) = [n for n in before if n.startswith("last.state-")]
    # A save within the epoch writes the training state (torch.save's writer) then last.safetensors
    # (safetensors'): no room (but for config.json) fails the first, room for the state alone the second.
    fill(small_disk, (64 << 10) if room == "none" else len(before[state]) + (1 << 20))
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "2", "--save-every", "0.0001"])
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("capcli: no space left on device: " + str(run)), last
    assert last.endswith(f"; the previous checkpoint is kept: make room and continue with: capcli train --resume {run}")
    assert "Traceback" not in result.output and "unexpected" not in result.output
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for name in ("last.safetensors", state):
        assert after[name] == before[name], name
    assert not list(run.glob(".*.tmp")) and list(run.glob("last.state-*.pt")) == [run / state]
    (small_disk / "filler").unlink()
    again = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "2"])
    assert again.exit_code == 0, again.output
    assert model_files.load_model(run / "last.safetensors").training["epochs"] == 2


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, shapes_dir):
    """-o under a regular file, or on a read-only filesystem: one line, exit 2, not "unexpected error"."""
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["train", "-o", str(tmp_path / "file" / "run"), "--data", str(shapes_dir), *ARGS])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == f"capcli: {tmp_path / 'file' / 'run'}: cannot create the run folder (not a directory)"
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        result = CliRunner().invoke(app, ["train", "-o", str(ro / "run"), "--data", str(shapes_dir), *ARGS])
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == f"capcli: {ro / 'run'}: cannot create the run folder (read-only file system)"


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    """An unknown layout or a missing data folder: nothing written (before: a run folder with config.json)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.txt").write_text("no images here")
    for data in (tmp_path / "data", tmp_path / "missing"):
        run = tmp_path / "run"
        result = CliRunner().invoke(app, ["train", "-o", str(run), "--data", str(data), *ARGS])
        assert result.exit_code == 2, result.output
        assert not run.exists()


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
    from capcli.infer import captioner as api

    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(api.Captioner, "encode", oom)
    result = CliRunner().invoke(app, ["caption", "-m", str(trained_model), str(shapes_dir / "Images")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "capcli: out of GPU memory: lower --batch-size (or use a smaller --grid / --image-size)"


def test_debug_shows_the_traceback(trained_model, monkeypatch, shapes_dir):
    from capcli.infer import captioner as api

    def boom(self, *a, **k):
        raise RuntimeError("something internal")

    monkeypatch.setattr(api.Captioner, "encode", boom)
    plain = CliRunner().invoke(app, ["caption", "-m", str(trained_model), str(shapes_dir / "Images")])
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    assert "capcli: unexpected error: RuntimeError: something internal (run with --debug" in plain.stderr
    debug = CliRunner().invoke(app, ["--debug", "caption", "-m", str(trained_model), str(shapes_dir / "Images")])
    assert debug.exit_code == 1  # the same exit code, with the traceback before the line
    assert "Traceback (most recent call last)" in debug.stderr and "RuntimeError: something internal" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("capcli: unexpected error: RuntimeError: something internal")


def test_debug_keeps_the_exit_code_of_bad_input(tmp_path):
    """--debug made a bad-input error (exit 2) a Python traceback with exit 1."""
    for flags in ([], ["--debug"]):
        result = CliRunner().invoke(app, [*flags, "caption", "-m", str(tmp_path / "missing.safetensors"), "x.jpg"])
        assert result.exit_code == 2, (flags, result.output)
        assert result.stderr.strip().splitlines()[-1] == f"capcli: {tmp_path / 'missing.safetensors'}: no such file"
        assert ("Traceback" in result.stderr) == bool(flags)


def test_a_resumed_epoch_counts_the_seconds_of_its_steps_only(tmp_path, shapes_dir, monkeypatch):
    """The epoch's train_seconds and captions/s after --resume: the steps' own time in each
    process, never the wall-clock time between the stop and the resume (here an hour)."""
    import os

    from capcli.train import loop as training

    run, calls = tmp_path / "run", []
    real_step = training.Trainer._step

    def step_then_ctrl_c(self, objective, batch):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # noted; the run stops after this step
        return real_step(self, objective, batch)

    monkeypatch.setattr(training.Trainer, "_step", step_then_ctrl_c)
    result = CliRunner().invoke(app, ["train", "-o", str(run), "--data", str(shapes_dir), "--epochs", "1",
                                      "--save-every", "0", *ARGS])
    assert result.exit_code == 130 and "interrupted in epoch 1 at step 5 by Ctrl-C" in result.stderr, result.output
    monkeypatch.setattr(training.Trainer, "_step", real_step)
    real_time = time.time
    monkeypatch.setattr(training.time, "time", lambda: real_time() + 3600)  # resumed an hour later
    assert CliRunner().invoke(app, ["train", "--resume", str(run)]).exit_code == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 < record["train_seconds"] < 60 and record["captions_per_s"] > 1


def _default_sighup():
    """Under `nohup pytest` SIGHUP is ignored and capcli rightly keeps it ignored; this test wants a terminal's."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")])
def test_sigterm_and_sighup_stop_captioning_like_ctrl_c(tmp_path, trained_model, shapes_dir, signum, code, name):
    """Any command: the signal unwinds like Ctrl-C (files closed, one line, 128 + the signal)
    instead of killing the process where it stands. The results written so far stay."""
    import os

    out = tmp_path / "out.tsv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "capcli", "caption", "-m", str(trained_model), "--device", "cpu",
                             "--batch-size", "1", "-o", str(out), "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=_default_sighup)
    image = next((shapes_dir / "Images").iterdir())
    proc.stdin.write(f"{image}\n")
    proc.stdin.flush()  # one path, then stdin stays open: capcli waits for more
    deadline = time.time() + 60
    while not (out.exists() and out.read_text().endswith("\n")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"capcli: interrupted by {name}"
    assert out.read_text().startswith(f"{image}\t")
