"""Shared fixtures: a tiny synthetic captioning dataset made on the fly, and small model settings.

The synthetic images are coloured shapes on a plain background; their captions name the colour
and the shape, so a model can learn them in seconds from real Lite0 features.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from pathlib import Path

import pytest

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("square", "circle")
MINI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-mini"

# Small model settings for fast tests (64 px images -> a 2x2 Lite0 grid).
SMALL = ["--image-size", "64", "--embed-dim", "32", "--attention-dim", "32", "--decoder-dim", "64", "--dropout", "0.1"]


def shape_image(colour: str, shape: str, size: int = 64, seed: int = 0):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    r = size // 4 + rng.randint(-3, 3)
    cx, cy = size // 2 + rng.randint(-6, 6), size // 2 + rng.randint(-6, 6)
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return img


def shape_captions(colour: str, shape: str) -> list[str]:
    return [
        f"a {colour} {shape}",
        f"A {colour} {shape} on a white background.",
        f"a small {colour} {shape}",
        f"the {shape} is {colour}",
        f"one {colour} {shape}, in the middle",
    ]


def make_shapes_dataset(root: Path, per_class: int = 6, size: int = 64) -> Path:
    """Kaggle layout: root/Images/*.png + root/captions.txt (quoted CSV). Returns root."""
    images = root / "Images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(per_class):
                name = f"{colour}_{shape}_{k}.png"
                shape_image(colour, shape, size, seed=k).save(images / name)
                rows += [(name, c) for c in shape_captions(colour, shape)]
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return root


def pytest_collection_modifyitems(config, items):
    """Tests that load OpenVINO into this process run last. Once its threads are in the process, a
    later in-process SIGINT in the fine-tuning resume test ended pytest with SIGSEGV (the same
    signals in capcli processes, OpenVINO loaded, are fine: tests/test_collection_hostile.py)."""
    items.sort(key=lambda item: item.get_closest_marker("openvino") is not None)  # stable: order kept otherwise


@pytest.fixture(autouse=True)
def torch_encoder_in_process(request, monkeypatch):
    """In this process `--runtime auto` means PyTorch, except in tests marked openvino (see above);
    capcli subprocesses choose as users' do."""
    if request.node.get_closest_marker("openvino") is None:
        from capcli.infer import openvino_encoder

        monkeypatch.setattr(openvino_encoder, "openvino_available", lambda: False)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """capcli's cache (converted encoders) in a folder of the test session's, never the user's."""
    folder = tmp_path_factory.mktemp("capcli-cache")
    os.environ["CAPCLI_CACHE_DIR"] = str(folder)  # for subprocesses too
    return folder


@pytest.fixture
def capcli_log(monkeypatch):
    """Let caplog see the "capcli" logger even after a CLI run made it stop propagating."""
    log = logging.getLogger("capcli")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", True)
    monkeypatch.setattr(log, "level", logging.NOTSET)
    return log


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "capcli" and r.levelno == logging.WARNING]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, shapes_dir) -> Path:
    """A model trained briefly on the shapes dataset (shared by the inference tests)."""
    from typer.testing import CliRunner

    from capcli.cli import app

    run = tmp_path_factory.mktemp("run") / "shapes"
    result = CliRunner().invoke(app, ["-q", "train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "12",
                                      "--batch-size", "16", "--lr", "3e-3", "--min-freq", "1", "--split", "80/20/0",
                                      "--device", "cpu", *SMALL])
    assert result.exit_code == 0, result.output
    return run / "best.safetensors"


@pytest.fixture(scope="session")
def mini_dir() -> Path:
    if not (MINI / "captions.txt").is_file():
        pytest.skip("flickr8k-mini not present (../shared/data/flickr8k-mini)")
    return MINI


def run_cli(*args, input=None):
    """capcli in this process (typer's CliRunner): exit_code, stdout and stderr apart."""
    from typer.testing import CliRunner

    from capcli.cli import app

    return CliRunner().invoke(app, list(args), input=input)


def cli_env(**extra) -> dict:
    """The environment of a capcli subprocess: no torchrun variables left over, no PYTHONUNBUFFERED
    (users don't set it), one thread, short collective timeouts."""
    env = dict(os.environ)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED"):
        env.pop(k, None)
    env.update({"OMP_NUM_THREADS": "1", "CAPCLI_DIST_TIMEOUT": "60", **extra})
    return env


@pytest.fixture
def no_java(monkeypatch):
    """Score as on a machine without Java (no METEOR, capcli's own tokenizer): METEOR's Java start-up
    costs ~8 s a call, which only the tests of the metrics themselves need to pay."""
    import capcli.metrics.captions as captions

    monkeypatch.setattr(captions, "java_available", lambda: False)
