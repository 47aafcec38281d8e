"""int8 encoders: calibrate a model's encoder on images of its own domain and quantize it with NNCF
for OpenVINO.

The recipe (docs/precision.md has the measurements): weights per channel, activations
per tensor, symmetric except where a layer's inputs are one-signed (NNCF's "mixed" preset); the
first and last convolutions kept in fp32, where 8 bits cost the most accuracy; weights in 7 bits
(NNCF's overflow fix), so the file gives the same numbers on CPUs without VNNI, whose 8-bit
products saturate.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import torch

from capcli.data.images import ImageError, image_to_tensor, load_image
from capcli.data.listing import walk_images
from capcli.errors import CapcliError
from capcli.files import cache_dir
from capcli.infer import openvino_encoder as ov_encoder
from capcli.model.caption_model import CaptionModel
from capcli.progress import Reporter

log = logging.getLogger("capcli")

MIN_CALIBRATION_IMAGES = 8
BATCH = 8


def calibration_images(folder: Path, count: int) -> list[str]:
    """Up to ``count`` image files from ``folder`` (and below), spread evenly over its sorted listing."""
    if not folder.is_dir():
        raise CapcliError(f"{folder}: not a folder of images")
    found = sorted(walk_images(folder))
    if len(found) <= count:
        return found
    return [found[i * len(found) // count] for i in range(count)]


def _pixels(model: CaptionModel, paths: list[str], reporter: Reporter) -> torch.Tensor:
    cfg, tensors, bad = model.cfg, [], 0
    reporter.start("reading calibration images", len(paths), "images")
    for path in paths:
        try:
            tensors.append(image_to_tensor(load_image(path, draft_size=cfg.image_size), cfg.image_size, cfg.mean, cfg.std))
        except ImageError as e:
            bad += 1
            log.warning("%s", e)
        reporter.update()
    reporter.stop()
    if len(tensors) < MIN_CALIBRATION_IMAGES:
        raise CapcliError(f"{len(tensors)} readable calibration images; int8 calibration needs at least "
                          f"{MIN_CALIBRATION_IMAGES} (a few hundred is better)")
    if bad:
        log.warning("%d of %d calibration images could not be read and were left out", bad, len(paths))
    return torch.stack(tensors)  # (N, 3, S, S)


def _end_convolutions(ov_model) -> list[str]:
    convolutions = [op.get_friendly_name() for op in ov_model.get_ordered_ops()
                    if op.get_type_name() in ("Convolution", "GroupConvolution")]
    return convolutions[:1] + convolutions[-1:] if len(convolutions) > 1 else []


def quantize_encoder(model: CaptionModel, tokenizer: str, images: list[str], output_dir: Path | None = None,
                     reporter: Reporter | None = None) -> tuple[Path, float]:
    """Quantize the model's encoder on ``images``; write it where captioning finds it (``output_dir``,
    default the cache's encoders/). Returns the file and the mean relative difference of its
    features from fp32's on the calibration images."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    except ImportError:
        raise CapcliError("capcli quantize needs NNCF, which is not installed: pip install 'capcli[quantize]'") from None
    pixels = _pixels(model, images, reporter or Reporter())  # (N, 3, S, S)
    ov_model = ov_encoder.convert(model)
    batches = [pixels[k:k + BATCH].numpy() for k in range(0, len(pixels), BATCH)]
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):  # NNCF draws its progress on stdout, which carries results
        quantized = nncf.quantize(
            ov_model, nncf.Dataset(batches), subset_size=len(pixels), preset=nncf.QuantizationPreset.MIXED,
            ignored_scope=nncf.IgnoredScope(names=_end_convolutions(ov_model), validate=False),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
        )
    key = ov_encoder.encoder_key(model, tokenizer)
    path = (output_dir or cache_dir() / "encoders") / f"{key}-int8.xml"
    try:
        ov_encoder.save(quantized, path)
    except OSError as e:
        raise CapcliError(f"{path}: cannot write the int8 encoder ({e.strerror or e})") from None
    int8 = ov_encoder.OpenVinoEncoder(path, model, "int8", str(path))
    sample = pixels[:32]
    with torch.inference_mode():
        reference = model.encoder.eval()(sample)  # (n, L, D)
    difference = ((int8(sample) - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).mean()
    return path, float(difference)
