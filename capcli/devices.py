"""Where models run: --device names -> torch devices, and mixed precision on GPUs."""

from __future__ import annotations

import contextlib
import os

import torch

from capcli.errors import CapcliError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CapcliError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapcliError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CapcliError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def amp_enabled() -> bool:
    """Mixed precision on CUDA, unless CAPCLI_AMP=0 (for comparisons and benchmarks)."""
    return os.environ.get("CAPCLI_AMP", "1").strip().lower() not in ("0", "off", "false", "no")


def autocast(device: torch.device):
    """bf16 autocast on GPUs that have it, fp16 on older ones; nothing on the CPU or with CAPCLI_AMP=0."""
    if device.type != "cuda" or not amp_enabled():
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
