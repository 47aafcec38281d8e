"""A model as ONNX graphs, so any runtime can serve it: the encoder, the decoder's first state and
its single step (``Decoder.step``, traced: the same definition training and search use).

    encoder.onnx  images (N, 3, S, S) float32           -> features (N, L, D)
    init.onnx     features (B, L, D)                    -> h (B, H), c (B, H), keys (B, L, A)
    step.onnx     words (B,) int64, h, c, features, keys -> logits (B, V), h, c, alpha (B, L)
    config.json   the model config: image size, mean and std of the pixels, special token ids
    vocab.json    capcli's vocabulary file

A GRU model has no ``c`` in or out. Every batch dimension is dynamic.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from capcli.files import atomic_write, atomic_write_bytes
from capcli.model.caption_model import CaptionModel
from capcli.model.decoder import DecoderState
from capcli.text.vocab import SPECIALS, Vocab

OPSET = 18


class _Init(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, features):
        state = self.decoder.init_state(features)
        return tuple(t for t in (state.h, state.c, state.keys) if t is not None)


class _Step(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder, self.lstm = model.decoder, model.cfg.rnn == "lstm"

    def forward(self, words, h, *rest):
        c, features, keys = rest if self.lstm else (None, *rest)
        logits, state, alpha = self.decoder.step(DecoderState(h, c, features, keys), words)
        return tuple(t for t in (logits, state.h, state.c, alpha) if t is not None)


def _export(module: nn.Module, inputs: tuple, names_in: list[str], names_out: list[str], path: Path) -> None:
    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about shape arithmetic
            torch.onnx.export(module.eval(), inputs, str(tmp), input_names=names_in, output_names=names_out,
                              dynamic_axes={n: {0: "batch"} for n in names_in + names_out},
                              opset_version=OPSET, dynamo=False)
    atomic_write(path, write)


@torch.no_grad()
def export_onnx(model: CaptionModel, vocab: Vocab, output_dir: Path) -> list[Path]:
    """Write the graphs and JSON files above into ``output_dir``; returns their paths."""
    model = model.cpu().eval()
    cfg, lstm = model.cfg, model.cfg.rnn == "lstm"
    output_dir.mkdir(parents=True, exist_ok=True)
    images = torch.zeros(2, 3, cfg.image_size, cfg.image_size)  # (2, 3, S, S)
    features = model.encoder(images)  # (2, L, D)
    state = model.decoder.init_state(features)
    states = ["h", "c"] if lstm else ["h"]
    _export(model.encoder, (images,), ["images"], ["features"], output_dir / "encoder.onnx")
    _export(_Init(model), (features,), ["features"], [*states, "keys"], output_dir / "init.onnx")
    words = torch.full((2,), SPECIALS.index("<start>"), dtype=torch.long)  # (2,)
    step_in = (words, state.h, *([state.c] if lstm else []), features, state.keys)
    _export(_Step(model), step_in, ["words", *states, "features", "keys"],
            ["logits", *(f"{s}_out" for s in states), "alpha"], output_dir / "step.onnx")
    config = {**cfg.to_dict(), "special_tokens": {name: i for i, name in enumerate(SPECIALS)},
              "graphs": {"encoder": "encoder.onnx", "init": "init.onnx", "step": "step.onnx"}}
    atomic_write_bytes(output_dir / "config.json", json.dumps(config, indent=1).encode())
    vocab.save(output_dir / "vocab.json")
    return [output_dir / name for name in ("encoder.onnx", "init.onnx", "step.onnx", "config.json", "vocab.json")]
