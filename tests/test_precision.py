"""--precision: the choice (auto, forced, a CPU without bf16), bf16 captions against fp32, the record."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from capcli.runtime import devices
from capcli.infer.captioner import Captioner
from capcli.cli import app
from capcli.errors import CapcliError
from conftest import SMALL

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not devices.cpu_has_bf16(), reason="this CPU has no bf16 instructions")


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: False)


def cpu(monkeypatch, bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: bf16)
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: amx)


def test_auto_picks_bf16_where_the_cpu_has_amx(monkeypatch):
    cpu(monkeypatch, bf16=True, amx=True)
    assert devices.resolve_precision("auto", CPU) == "bf16"
    assert devices.resolve_precision("fp32", CPU) == "fp32"
    assert devices.precision_note("auto", "bf16", CPU) == "precision: bf16 for the encoder (auto: this CPU has AMX)"


def test_auto_keeps_fp32_with_avx512_bf16_alone_where_bf16_can_be_forced(monkeypatch):
    cpu(monkeypatch, bf16=True, amx=False)  # AMD Zen 4: bf16 measured no faster than fp32
    assert devices.resolve_precision("auto", CPU) == "fp32"
    assert devices.resolve_precision("bf16", CPU) == "bf16"
    assert "has AVX512-BF16 but no AMX" in devices.precision_note("auto", "fp32", CPU)
    assert devices.precision_note("bf16", "bf16", CPU) == "precision: bf16 (--precision bf16)"


def test_a_cpu_without_bf16_falls_back_to_fp32_and_refuses_forced_bf16(no_bf16):
    assert devices.resolve_precision("auto", CPU) == "fp32"
    assert devices.precision_note("auto", "fp32", CPU) == "precision: fp32 (auto: this CPU has no bf16 instructions, AVX512-BF16 or AMX)"
    with pytest.raises(CapcliError, match=r"^--precision bf16: this CPU has no bf16 instructions"):
        devices.resolve_precision("bf16", CPU)
    with pytest.raises(CapcliError, match=r"^--precision fp16 is for CUDA GPUs"):
        devices.resolve_precision("fp16", CPU)
    with pytest.raises(CapcliError, match=r"^--precision 'int4'"):
        devices.resolve_precision("int4", CPU)


def test_detection_follows_pytorchs_cpu_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert devices.cpu_has_bf16() is False
    assert devices.cpu_has_amx() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert devices.cpu_has_bf16() is True and devices.cpu_has_amx() is True


def test_forced_bf16_on_a_cpu_without_it_is_a_one_line_error(no_bf16, trained_model, shapes_dir):
    image = next((shapes_dir / "Images").iterdir())
    result = CliRunner().invoke(app, ["caption", "-m", str(trained_model), "--device", "cpu", "--precision", "bf16", str(image)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "capcli: --precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX); use fp32 (or auto)"]


@needs_bf16
def test_bf16_captions_agree_with_fp32_on_most_images(trained_model, shapes_dir):
    images = sorted((shapes_dir / "Images").iterdir())
    fp32 = Captioner.load(trained_model, "cpu", "fp32").caption(images, beam_size=3)
    bf16 = Captioner.load(trained_model, "cpu", "bf16").caption(images, beam_size=3)
    same = sum(a.caption == b.caption for a, b in zip(fp32, bf16))
    assert same >= 0.8 * len(images), (same, len(images))
    assert Captioner.load(trained_model, "cpu").precision == devices.resolve_precision("auto", CPU)


def test_the_run_records_its_precision(tmp_path, shapes_dir, no_bf16):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "1", "--device", "cpu",
                                      "--min-freq", "1", "--split", "80/20/0", "--save-every", "0", *SMALL])
    assert result.exit_code == 0, result.output
    assert "capcli: precision: fp32 (auto: this CPU has no bf16 instructions, AVX512-BF16 or AMX)" in result.output
    assert json.loads((run / "config.json").read_text())["precision"] == "fp32"
    from capcli.model import files as model_files

    assert model_files.load_model(run / "last.safetensors").training["precision"] == "fp32"


class _Props:
    def __init__(self, major: int):
        self.major = major


@pytest.mark.parametrize("major, auto", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_auto_on_a_gpu_counts_native_bf16_only(monkeypatch, major, auto):
    """Volta and Turing (compute capability 7.x) only emulate bf16, slower than fp16: auto must
    not pick it there, nor --precision bf16 pass (torch.cuda.is_bf16_supported() says True there)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props(major))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or major >= 8)
    gpu = torch.device("cuda", 0)
    assert devices.resolve_precision("auto", gpu) == auto
    if auto == "fp16":
        with pytest.raises(CapcliError, match=r"^--precision bf16: this GPU has no bf16"):
            devices.resolve_precision("bf16", gpu)
    else:
        assert devices.resolve_precision("bf16", gpu) == "bf16"
