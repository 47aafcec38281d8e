"""The Python face of capcli: load a model file, caption images. The CLI is a thin layer over it.

    from capcli import Captioner
    cap = Captioner.load("model.safetensors", device="cpu")   # or Captioner.load() for the shipped model
    print(cap.caption("photo.jpg").caption)                    # one image -> one CaptionResult
    for r in cap.caption(["a.jpg", "b.jpg"], beam_size=3):      # several -> a list, in order
        print(r.caption, r.score)
    cap.caption("https://example.com/dog.jpg")                 # http(s) URLs and PIL images too
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch

from capcli.model import files as model_files
from capcli.metrics.chemistry import rdkit_available, valid_first
from capcli.runtime.devices import resolve_device
from capcli.infer.encoding import TorchEncoder, choose_encoder
from capcli.data.images import MAX_IMAGE_PIXELS, ImageError, image_batches, model_input
from capcli.infer.decode import DecodeOptions, Hypothesis, decode
from capcli.text.tokenizers import DEFAULT_DECODE_LEN, DEFAULT_NO_REPEAT_NGRAM
from capcli.infer.shipped import DEFAULT_MODEL_NAME, SHIPPED_MODELS, default_model_path, model_path  # noqa: F401 (the API)

@dataclass
class CaptionResult:
    path: str | None
    caption: str = ""
    tokens: list[str] = field(default_factory=list)
    score: float = float("nan")  # length-normalised log-probability (higher is better)
    logprob: float = float("nan")  # total log-probability
    attention: torch.Tensor | None = None  # (T, h, w): where each word looked
    alternatives: list["CaptionResult"] = field(default_factory=list)  # with nbest > 1, the runners-up
    error: str | None = None  # set when the image could not be read; the other fields are then empty

    @property
    def ok(self) -> bool:
        return self.error is None


class Captioner:
    def __init__(self, loaded: model_files.LoadedModel, device: torch.device, precision: str = "fp32", encoder=None):
        self.loaded = loaded
        self.model, self.vocab, self.metadata = loaded.model, loaded.vocab, loaded.metadata
        self.device = device
        self.cfg = self.model.cfg
        # images -> features; the search after it runs on PyTorch in fp32
        self.encoder = encoder or TorchEncoder(self.model, device, precision)
        self.precision = self.encoder.precision
        self._grid: tuple[int, int] | None = None

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", precision: str = "auto",
             runtime: str = "auto", images: int | None = None) -> "Captioner":
        """``path``: a model file, a shipped model's short name (default, captions, smiles), or None
        for the default model. ``precision`` of the encoder: auto, fp32, bf16, fp16 (GPU) or int8
        (CPU); ``runtime``: auto (OpenVINO on the CPU when installed, and ``images``, how many will
        be captioned if known, are enough to pay for starting it), torch or openvino; see
        infer.encoding.choose_encoder. The search always runs in fp32."""
        dev = resolve_device(device)
        file = model_path(path)
        loaded = model_files.load_model(file, dev)
        encoder = choose_encoder(loaded.model, loaded.vocab.tokenizer, dev, precision, runtime,
                                 model_name=str(path) if path is not None else "default", images=images)
        return cls(loaded, dev, encoder=encoder)

    @property
    def training(self) -> dict:
        """The training summary stored in the model file (data, split, epochs, scores...)."""
        return self.loaded.training

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the attention grid."""
        if self._grid is None:
            size = self.cfg.image_size
            self._grid = self.model.grid_shape(self.encode(torch.zeros(1, 3, size, size)).size(1))
        return self._grid

    # ------------------------------------------------------------------ core
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, L, D) features."""
        return self.encoder(images)

    @torch.inference_mode()
    def decode(self, features: torch.Tensor, options: DecodeOptions) -> list[list[Hypothesis]]:
        """features (B, L, D) -> per image, ``options.nbest`` hypotheses, best first. For a SMILES
        model with RDKit installed, a beam's valid molecules rank before strings RDKit cannot read."""
        if options.max_len is None:
            options = replace(options, max_len=DEFAULT_DECODE_LEN[self.vocab.tokenizer])
        if options.no_repeat_ngram is None:
            options = replace(options, no_repeat_ngram=DEFAULT_NO_REPEAT_NGRAM[self.vocab.tokenizer])
        if self.vocab.tokenizer != "smiles" or options.beam_size == 1 or not rdkit_available():
            return decode(self.model.decoder, features, options)
        beams = decode(self.model.decoder, features, replace(options, nbest=options.beam_size))
        ranked = [[hyps[i] for i in valid_first([self.vocab.decode(h.tokens) for h in hyps])] for hyps in beams]
        return [hyps[:options.nbest] for hyps in ranked]

    def _result(self, path: str | None, hyps: list[Hypothesis]) -> CaptionResult:
        if self._grid is None:  # from the features' L: no encoder run just for the shape
            self._grid = self.model.grid_shape(hyps[0].alphas.size(1))
        h, w = self._grid
        results = [
            CaptionResult(
                path=path, caption=self.vocab.decode(hyp.tokens), tokens=self.vocab.decode_ids(hyp.tokens),
                score=hyp.score, logprob=hyp.logprob,
                attention=hyp.alphas.view(-1, h, w) if hyp.alphas.size(1) == h * w else hyp.alphas,
            )
            for hyp in hyps
        ]
        best = results[0]
        best.alternatives = results[1:]
        return best

    # ------------------------------------------------------------------ public
    def caption_stream(
        self,
        paths: Iterable,
        options: DecodeOptions = DecodeOptions(),
        batch_size: int = 32,
        workers: int = 2,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> Iterator[CaptionResult]:
        """Caption a stream of image files, http(s) URLs or PIL images, yielding results in input
        order as each batch finishes. A result's ``path`` is the path or URL as given (None for a
        PIL image).

        Images load in ``workers`` threads: ahead of the model on a GPU, between batches on the
        CPU (see images.image_batches). An unreadable image, or a PIL image that cannot be used
        (no pixels, damaged), yields a result with ``error`` set and the others go on. Images over
        ``max_pixels`` (0: no limit) are refused unread.
        """
        cfg = self.cfg
        for items in image_batches(paths, cfg.image_size, batch_size, workers,
                                   overlap=self.device.type == "cuda", max_pixels=max_pixels):
            good = [t for _, t in items if not isinstance(t, ImageError)]
            hyps = iter([])
            if good:
                features = self.encode(model_input(good, self.device, cfg.mean, cfg.std))  # (n, L, D)
                hyps = iter(self.decode(features, options))
            for item, t in items:
                path = None if _is_pil(item) else str(item)
                yield CaptionResult(path, error=str(t)) if isinstance(t, ImageError) else self._result(path, next(hyps))

    def caption(self, images, options: DecodeOptions | None = None, batch_size: int = 32, *,
                max_pixels: int = MAX_IMAGE_PIXELS, **decode_options):
        """Caption one image or several: a path (str or Path), an http(s) URL or a PIL image gives
        one CaptionResult; an iterable of them gives a list, in order. Unreadable images (files,
        URLs or PIL images) give results with ``error`` set; the others are captioned.

        ``decode_options`` (beam_size=3, nbest=..., max_len=..., length_penalty=...,
        no_repeat_ngram=...) change ``options``.
        """
        options = replace(options or DecodeOptions(), **decode_options)
        single = _is_image(images)
        if not single and (isinstance(images, (bytes, bytearray)) or not isinstance(images, Iterable)):
            raise TypeError(f"images must be a path (str or Path), a PIL image or an iterable of them, "
                            f"not {type(images).__name__}")
        items = [images] if single else list(images)
        for item in items:
            if not _is_image(item):
                raise TypeError(f"images must be paths (str or Path) or PIL images, not {type(item).__name__}")
        results = list(self.caption_stream(items, options, batch_size, max_pixels=max_pixels))
        return results[0] if single else results


def _is_image(obj) -> bool:
    return isinstance(obj, (str, os.PathLike)) or _is_pil(obj)


def _is_pil(obj) -> bool:
    from PIL import Image

    return isinstance(obj, Image.Image)
