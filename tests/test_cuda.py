"""GPU paths: AMP training, pinned-memory batches, captioning on cuda. Skipped without a CUDA GPU."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from capcli.model import files as model_files
from capcli.cli import app
from conftest import SMALL

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_training_on_cuda_with_amp_lowers_the_loss(tmp_path, shapes_dir):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "4", "--batch-size", "16",
                                      "--lr", "3e-3", "--min-freq", "1", "--split", "80/20/0", "--device", "cuda", *SMALL])
    assert result.exit_code == 0, result.output
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["train_loss"] < 0.8 * m[0]["train_loss"]
    loaded = model_files.load_model(run / "best.safetensors")
    assert all(t.dtype == torch.float32 for t in loaded.model.state_dict().values() if t.is_floating_point())


def test_fine_tuning_on_cuda(tmp_path, shapes_dir):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "1", "--batch-size", "16",
                                      "--min-freq", "1", "--split", "80/20/0", "--device", "cuda", "--fine-tune-encoder", *SMALL])
    assert result.exit_code == 0, result.output


def test_captions_on_cuda_match_the_cpu(trained_model, shapes_dir):
    from capcli.infer.captioner import Captioner

    paths = sorted((shapes_dir / "Images").glob("*.png"))
    cpu = Captioner.load(trained_model, "cpu").caption(paths, beam_size=3)
    gpu = Captioner.load(trained_model, "cuda").caption(paths, beam_size=3)
    same = sum(a.caption == b.caption for a, b in zip(cpu, gpu))
    assert same >= 0.9 * len(paths)  # bf16 encoder features may flip a near tie


def test_batched_beam_on_cuda_equals_one_at_a_time(trained_model, shapes_dir):
    from capcli.infer.captioner import Captioner

    cap = Captioner.load(trained_model, "cuda")
    paths = sorted((shapes_dir / "Images").glob("*.png"))[:12]
    batched = [r.caption for r in cap.caption(paths, beam_size=3, batch_size=12)]
    alone = [cap.caption([p], beam_size=3)[0].caption for p in paths]
    assert batched == alone
