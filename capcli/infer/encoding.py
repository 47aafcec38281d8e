"""Which encoder runs when captioning, and in what precision: PyTorch (GPUs; fp32/bf16/fp16) or
OpenVINO on the CPU (fp32, or int8 on CPUs with 8-bit dot products). The search always runs on
PyTorch in fp32; this is only the image -> features half."""

from __future__ import annotations

import logging

import torch

from capcli.choices import CAPTION_PRECISIONS, OPENVINO_FROM_IMAGES, RUNTIMES
from capcli.errors import CapcliError
from capcli.infer import openvino_encoder as ov_encoder
from capcli.model.caption_model import CaptionModel
from capcli.runtime.devices import autocast, cpu_has_int8_dot, encoder_batch, resolve_precision

log = logging.getLogger("capcli")


class TorchEncoder:
    """The model's own encoder, (N, 3, S, S) -> (N, L, D), in chunks of the size it runs fastest at."""

    runtime = "torch"

    def __init__(self, model: CaptionModel, device: torch.device, precision: str):
        self.model, self.device, self.precision = model, device, precision
        self.chunk = encoder_batch(device, precision)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for k in range(0, images.size(0), self.chunk):
            x = images[k:k + self.chunk].to(self.device, non_blocking=True)  # (c, 3, S, S)
            with autocast(self.device, self.precision):
                out.append(self.model.encoder(x).float())  # (c, L, D)
        return torch.cat(out)  # (N, L, D)


def choose_encoder(model: CaptionModel, tokenizer: str, device: torch.device, precision: str = "auto",
                   runtime: str = "auto", model_name: str = "MODEL", images: int | None = None):
    """(--precision, --runtime) -> the encoder to call, ``TorchEncoder`` or ``OpenVinoEncoder``;
    its ``precision`` says what runs. auto on the CPU: OpenVINO when installed, unless ``images``
    (how many will be encoded, when known) is fewer than OPENVINO_FROM_IMAGES; int8 when this CPU
    has 8-bit dot products (VNNI, AMX) and an int8 version of this encoder exists (shipped, or
    made by `capcli quantize`), and a line on stderr says so; else fp32."""
    if runtime not in RUNTIMES:
        raise CapcliError(f"--runtime {runtime!r}: choose {', '.join(RUNTIMES)}")
    if runtime == "openvino" and device.type != "cpu":
        raise CapcliError(f"--runtime openvino runs the encoder on the CPU, not on --device {device}")
    if runtime == "torch" and precision == "int8":
        raise CapcliError("--precision int8 runs on OpenVINO: use --runtime openvino (or auto)")
    resolved = resolve_precision(precision, device, CAPTION_PRECISIONS)
    worth_starting = images is None or images >= OPENVINO_FROM_IMAGES
    on_openvino = device.type == "cpu" and (runtime == "openvino" or resolved == "int8"
                                            or (runtime == "auto" and worth_starting and ov_encoder.openvino_available()))
    if not on_openvino:
        return TorchEncoder(model, device, resolved)
    ov_encoder.import_openvino("--runtime openvino" if runtime == "openvino" else f"--precision {resolved}")
    key = ov_encoder.encoder_key(model, tokenizer)
    if precision == "auto" and cpu_has_int8_dot() and ov_encoder.find_encoder(key, "int8"):
        log.info("precision: int8 encoder on OpenVINO (auto: this CPU has 8-bit dot products; "
                 "--precision fp32 turns it off)")
        resolved = "int8"
    if resolved == "int8":
        return ov_encoder.int8_encoder(model, key, model_name)
    return ov_encoder.fp32_encoder(model, key, resolved)
