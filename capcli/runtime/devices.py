"""Where models run: --device names -> torch devices, and mixed precision on GPUs."""

from __future__ import annotations

import contextlib

import torch

from capcli.choices import PRECISIONS
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


def cpu_has_bf16() -> bool:
    """Does this CPU compute in bf16 natively (AVX512-BF16 or AMX), as PyTorch's cpuinfo reports it?

    oneDNN also runs bf16 on plain AVX-512 by emulation, slower than fp32: that does not count.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def gpu_has_bf16(device: torch.device) -> bool:
    """Does this GPU compute in bf16 natively? NVIDIA from compute capability 8.0 (Ampere) on; Volta
    and Turing only emulate it, slower than fp16 (torch.cuda.is_bf16_supported() counts emulation, and
    asks about the current device, not ``device``). ROCm GPUs have it."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def cpu_has_amx() -> bool:
    """AMX tiles (Intel Sapphire Rapids and later): bf16 matrix units, where bf16 pays on the CPU."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def cpu_has_int8_dot() -> bool:
    """Does this CPU multiply 8-bit integers into 32-bit sums in one instruction (AVX512-VNNI,
    AVX-VNNI or AMX)? Without it (plain AVX2/AVX-512) 8-bit products go through 16-bit sums that
    saturate, and int8 is neither fast nor exact enough to choose by default."""
    if getattr(torch.cpu, "_is_vnni_supported", lambda: False)() or cpu_has_amx():
        return True
    try:
        with open("/proc/cpuinfo", "rb") as f:
            flags = next((line for line in f if line.startswith(b"flags")), b"").split()
    except OSError:
        return False
    return b"avx_vnni" in flags or b"amx_int8" in flags


def resolve_precision(name: str, device: torch.device, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """--precision -> "fp32", "bf16", "fp16" or "int8" for ``device``; a precision the device lacks
    is an error. auto never gives int8 here: that depends on the encoder (infer.encoding).

    auto: on a GPU bf16 where it has it, else fp16. On a CPU bf16 only with AMX: with AVX512-BF16
    alone (AMD Zen 4) the encoder runs no faster in bf16 than in fp32 at its best batch size, and
    its captions move a little (docs/performance-notes.md), so auto keeps fp32 there.
    """
    if name not in allowed:
        raise CapcliError(f"--precision {name!r}: choose {', '.join(allowed)}")
    cuda = device.type == "cuda"
    if name == "int8" and cuda:
        raise CapcliError("--precision int8 runs the encoder on OpenVINO, on the CPU; on a GPU use bf16, fp16 or fp32")
    if name == "auto":
        if cuda:
            return "bf16" if gpu_has_bf16(device) else "fp16"
        return "bf16" if cpu_has_amx() else "fp32"
    if name == "fp16" and not cuda:
        raise CapcliError("--precision fp16 is for CUDA GPUs; on the CPU use bf16 (where it has it) or fp32")
    if name == "bf16" and cuda and not gpu_has_bf16(device):
        raise CapcliError("--precision bf16: this GPU has no bf16; use fp16 or fp32")
    if name == "bf16" and not cuda and not cpu_has_bf16():
        raise CapcliError("--precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX); use fp32 (or auto)")
    return name


def precision_note(name: str, resolved: str, device: torch.device) -> str:
    """One line saying which precision runs and why, for the log."""
    if name != "auto":
        return f"precision: {resolved} (--precision {name})"
    if device.type == "cuda":
        return f"precision: {resolved} (auto: this GPU {'has' if resolved == 'bf16' else 'lacks'} bf16)"
    if resolved == "bf16":
        return "precision: bf16 for the encoder (auto: this CPU has AMX)"
    if cpu_has_bf16():
        return ("precision: fp32 (auto: this CPU has AVX512-BF16 but no AMX, and bf16 runs no faster there; "
                "--precision bf16 forces it)")
    return "precision: fp32 (auto: this CPU has no bf16 instructions, AVX512-BF16 or AMX)"


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision`` ("bf16", "fp16"), or nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def encoder_batch(device: torch.device, precision: str) -> int:
    """Images per encoder call: on the CPU Lite0 is fastest a few at a time (docs/performance-notes.md)."""
    if device.type == "cuda":
        return 64
    return 16 if precision == "bf16" else 4


def decoder_precision(precision: str, device: torch.device) -> str:
    """The decoder's precision: as asked on a GPU; fp32 on the CPU, where its small matrices gain
    nothing from bf16 (docs/performance-notes.md)."""
    return precision if device.type == "cuda" else "fp32"
