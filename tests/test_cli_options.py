"""Command-line options: help text and panels, global flags anywhere, choices, --max-image-pixels,
and results that reach a pipe as they are made."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from capcli.cli import app

PANELS = {
    None: set(),
    "caption": {"Input", "Model", "Decoding", "Output", "Performance"},
    "beam": {"Input", "Model", "Decoding", "Output", "Performance"},
    "evaluate": {"Data", "Model", "Decoding", "Output", "Performance"},
    "build-vocab": {"Data", "Vocabulary"},
}


def run(*args, input=None):
    return CliRunner().invoke(app, list(args), input=input)


@pytest.fixture(scope="module")
def images(shapes_dir) -> list[Path]:
    return sorted((shapes_dir / "Images").glob("*.png"))


def test_results_reach_a_pipe_one_at_a_time(trained_model, images):
    """`capcli caption - | consumer`: each caption is readable as soon as it is made, not when
    Python's pipe buffer fills (users run without PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    cmd = [sys.executable, "-m", "capcli", "caption", "-", "--batch-size", "1", "-m", str(trained_model),
           "--device", "cpu", "-f", "tsv"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        for image in images[:2]:
            proc.stdin.write(f"{image}\n")
            proc.stdin.flush()  # stdin stays open: capcli cannot have reached the end of its input
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"no caption for {image.name} within 60 s: stdout is not flushed")
            path, caption = line.rstrip("\n").split("\t")
            assert path == str(image) and caption
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("command", list(PANELS))
def test_help_at_80_columns_is_readable(command):
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "<bool>" not in text and "BOOLEAN" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for panel in PANELS[command]:
        assert f"─ {panel} ─" in text
    group = typer.main.get_command(app)
    params = group.params if command is None else group.commands[command].params
    assert params and not [p.name for p in params if not p.help]


def test_global_flags_may_follow_the_command(trained_model, shapes_dir, tmp_path):
    assert run("caption", "-q", "--help").exit_code == 0
    # (every image refused by --max-image-pixels: the run ends before the slow scoring)
    args = ["evaluate", "-m", str(trained_model), "--data", str(shapes_dir), "--split", "val", "--max-image-pixels", "1"]
    loud, quiet = run(*args), run(*args, "-q")
    assert "capcli: data: " in loud.stderr  # load_dataset's info line
    assert "capcli: data: " not in quiet.stderr
    for result in (loud, quiet):  # errors still shown
        assert result.exit_code == 1 and "capcli: no image could be captioned" in result.stderr
    # --debug after the command: the traceback mode, the traceback before the one line
    debug = run("caption", "-m", str(tmp_path / "missing.safetensors"), str(shapes_dir), "--debug")
    assert debug.exit_code == 2 and "No such option" not in debug.output
    assert "Traceback" in debug.stderr and "CapcliError" in debug.stderr
    # after a `--` it is a path, not a flag
    dashed = run("caption", "-m", str(trained_model), "--", "-q")
    assert dashed.exit_code == 1 and "capcli: -q: no such file" in dashed.stderr


def test_split_is_a_choice_checked_before_the_model_loads(tmp_path):
    result = run("evaluate", "-m", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path), "--split", "dev")
    assert result.exit_code == 2
    assert "'dev'" in result.output and "test" in result.output and "val" in result.output
    assert "no such file" not in result.output


def test_max_image_pixels_refuses_larger_images(trained_model, images, shapes_dir):
    # the shapes are 64 x 64 = 4096 pixels
    over = run("caption", "-m", str(trained_model), "-f", "jsonl", "--max-image-pixels", "4095", str(images[0]))
    assert over.exit_code == 1
    assert "image too large" in json.loads(over.stdout)["error"]
    assert "image too large" in over.stderr
    for limit in ("4096", "0"):  # at the limit, and no limit
        ok = run("beam", "-m", str(trained_model), "-f", "jsonl", "--max-image-pixels", limit, str(images[0]))
        assert ok.exit_code == 0, ok.output
    refused = run("evaluate", "-m", str(trained_model), "--data", str(shapes_dir), "--split", "val", "--limit", "2",
                  "--max-image-pixels", "4095")
    assert refused.exit_code == 1 and "no image could be captioned" in refused.stderr
