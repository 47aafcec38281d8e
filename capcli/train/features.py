"""Where training gets its encoder features, behind one interface: the cache, the cache of the
encoder's frozen lower part, or the encoder itself.

- ``CachedFeatures`` (frozen encoder, the default): every image was encoded once into the run
  folder's cache; an epoch only reads rows. Batches are bucketed by caption length.
- ``CachedLowerOutputs`` (``--fine-tune-blocks N``): the cache holds the output of the frozen part
  below the top N blocks; a step runs those N blocks on the batch's images, inside the forward
  that DDP wraps, so they learn.
- ``EncodedImages`` (``--fine-tune-encoder``, or every block fine-tuned): the batch's images are
  decoded and go through the whole encoder at every step, inside the forward that DDP wraps.

The last two draw batches by image, and each image's encoder output is shared by all of its
captions. All three give the training loop the same three things: the epoch's batches, a step's
inputs (TrainNet runs the source's ``top_blocks`` on them), and features for validation. Images
that cannot be read are in ``bad`` (row -> reason); their captions are left out of every batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from capcli.train.feature_cache import FeatureCache
from capcli.data.images import MAX_IMAGE_PIXELS, ImageError, image_batches, model_input
from capcli.model.config import ModelConfig
from capcli.model.encoders import Encoder


@dataclass
class CaptionSet:
    """Encoded captions of one split: caption i belongs to image ``image[i]`` (a row of the source)."""

    image: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of indices whose captions have (nearly) the same length, in random order.

    Sorting by length (random order within a length) keeps padding out of the batches;
    shuffling the batches keeps the epoch random.
    """
    noise = torch.rand(len(lengths), generator=generator).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], noise[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def image_batches_of(captions: CaptionSet, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of caption indices by image, in random order: every caption of an image in the same
    batch (about ``batch_size`` captions), so the encoder's top runs once for all of them."""
    by_image: dict[int, list[int]] = {}
    for i, img in enumerate(captions.image):
        by_image.setdefault(img, []).append(i)
    images = list(by_image)
    perm = torch.randperm(len(images), generator=generator).tolist()
    per_batch = max(1, batch_size // max(1, round(len(captions) / max(len(images), 1))))
    order = [images[i] for i in perm]
    return [[c for img in order[k:k + per_batch] for c in by_image[img]] for k in range(0, len(order), per_batch)]


def _cached_rows(cache: FeatureCache, rows: list[int], device: torch.device) -> torch.Tensor:
    """Rows of the cache on ``device`` in fp32: (N, L, D) or (N, C, h, w)."""
    f = cache.features[torch.tensor(rows, dtype=torch.long)]  # fp16
    if device.type == "cuda":
        f = f.pin_memory()
    return f.to(device, non_blocking=True).float()


class StepInputs:
    """One step's images, loaded: ``loaded_rows`` says which rows can be trained on (their images
    loaded), ``inputs_for_rows`` gives what the training net takes for captions whose images are
    ``rows`` (in caption order)."""

    def __init__(self, loaded_rows: set[int]):
        self.loaded_rows = loaded_rows

    def inputs_for_rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class CachedFeatures:
    top_blocks = 0  # the cache holds the features: no encoder block runs in a step
    finds_bad_images = False  # the cache knows them all before training starts

    def __init__(self, cache: FeatureCache, device: torch.device):
        self.cache, self.device = cache, device
        self.bad: dict[int, str] = dict(cache.bad)

    def batches(self, captions: CaptionSet, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        return length_bucketed_batches([len(t) for t in captions.tokens], batch_size, generator)

    def load(self, rows: list[int]) -> StepInputs:
        return _CachedInputs(self, {r for r in rows if r not in self.bad})

    def placeholder(self, row: int) -> StepInputs:
        """Inputs for a zero-weight step (a process left with no caption to train on must still join DDP)."""
        return _CachedInputs(self, {row})  # a bad image's row of the cache holds zeros

    def rows_features(self, rows: list[int]) -> torch.Tensor:
        return _cached_rows(self.cache, rows, self.device)  # (N, L, D)

    @torch.no_grad()
    def features(self, rows: list[int]) -> tuple[torch.Tensor, list[bool]]:
        """Validation: features (n, L, D) of those of ``rows`` whose images load, and which rows they are."""
        ok = [r not in self.bad for r in rows]
        return self.rows_features([r for r, good in zip(rows, ok) if good]), ok


class _CachedInputs(StepInputs):
    def __init__(self, source: CachedFeatures, loaded_rows: set[int]):
        super().__init__(loaded_rows)
        self.source = source

    def inputs_for_rows(self, rows):
        return self.source.rows_features(rows), None  # (N, L, D)


class CachedLowerOutputs:
    """--fine-tune-blocks N: the cache holds each image's output of the encoder's frozen part
    below its top N blocks (C, h, w); a step's inputs are those rows of the batch's distinct
    images, on which TrainNet runs the top N blocks."""

    finds_bad_images = False  # the cache knows them all before training starts

    def __init__(self, cache: FeatureCache, encoder: Encoder, blocks: int, device: torch.device):
        self.cache, self.encoder, self.top_blocks, self.device = cache, encoder, blocks, device
        self.bad: dict[int, str] = dict(cache.bad)

    def batches(self, captions: CaptionSet, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        return image_batches_of(captions, batch_size, generator)

    def load(self, rows: list[int]) -> StepInputs:
        return _LowerInputs(self, {r for r in rows if r not in self.bad})

    def placeholder(self, row: int) -> StepInputs:
        return _LowerInputs(self, {row})  # a bad image's row of the cache holds zeros

    @torch.no_grad()
    def features(self, rows: list[int]) -> tuple[torch.Tensor, list[bool]]:
        ok = [r not in self.bad for r in rows]
        lower = _cached_rows(self.cache, [r for r, good in zip(rows, ok) if good], self.device)  # (n, C, h, w)
        return self.encoder.upper(lower, self.top_blocks), ok  # (n, L, D)


class _LowerInputs(StepInputs):
    def __init__(self, source: CachedLowerOutputs, loaded_rows: set[int]):
        super().__init__(loaded_rows)
        self.source = source

    def inputs_for_rows(self, rows):
        """The lower part's output of the distinct images (n_img, C, h, w) and each caption's image among them (N,)."""
        images = sorted(set(rows))
        where = {r: k for k, r in enumerate(images)}
        index = torch.tensor([where[r] for r in rows]).to(self.source.device, non_blocking=True)  # (N,)
        return _cached_rows(self.source.cache, images, self.source.device), index


class EncodedImages:
    finds_bad_images = True  # while training, each process its own

    def __init__(self, encoder: Encoder, paths: Sequence[Path], cfg: ModelConfig, device: torch.device,
                 workers: int, max_pixels: int = MAX_IMAGE_PIXELS):
        self.encoder, self.paths, self.cfg, self.device, self.workers = encoder, paths, cfg, device, workers
        self.max_pixels = max_pixels
        self.top_blocks = len(encoder.block_names)  # the whole encoder, on the images
        self.bad: dict[int, str] = {}  # found while training; kept in the training state for --resume

    def batches(self, captions: CaptionSet, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        return image_batches_of(captions, batch_size, generator)

    def _pixels(self, rows: list[int]) -> dict[int, torch.Tensor]:
        """Decode the images of ``rows`` not known to be bad: row -> (S, S, 3) uint8; records new bad ones."""
        todo = sorted({r for r in rows if r not in self.bad})
        if not todo:
            return {}
        items = next(image_batches([self.paths[r] for r in todo], self.cfg.image_size, len(todo), self.workers,
                                   overlap=False, max_pixels=self.max_pixels))
        pixels = {}
        for r, (path, item) in zip(todo, items):
            if isinstance(item, ImageError):
                self.bad[r] = f"{path}: {item}"
            else:
                pixels[r] = item
        return pixels

    def _normalised(self, pixels: dict[int, torch.Tensor]) -> torch.Tensor:
        return model_input(pixels.values(), self.device, self.cfg.mean, self.cfg.std)  # (n_img, 3, S, S)

    def load(self, rows: list[int]) -> StepInputs:
        return _ImageInputs(self, self._pixels(rows))

    def placeholder(self, row: int) -> StepInputs:
        size = self.cfg.image_size
        return _ImageInputs(self, {row: torch.zeros(size, size, 3, dtype=torch.uint8)})

    @torch.no_grad()
    def features(self, rows: list[int]) -> tuple[torch.Tensor, list[bool]]:
        pixels = self._pixels(rows)
        ok = [r in pixels for r in rows]
        if not pixels:
            return torch.zeros(0, 0, 0, device=self.device), ok
        where = {r: k for k, r in enumerate(pixels)}
        index = torch.tensor([where[r] for r, good in zip(rows, ok) if good], device=self.device)
        return self.encoder(self._normalised(pixels))[index], ok  # (n, L, D)


class _ImageInputs(StepInputs):
    def __init__(self, source: EncodedImages, pixels: dict[int, torch.Tensor]):
        super().__init__(set(pixels))
        self.source, self.pixels = source, pixels

    def inputs_for_rows(self, rows):
        """The distinct images (n_img, 3, S, S) and each caption's image among them (N,)."""
        where = {r: k for k, r in enumerate(self.pixels)}
        index = torch.tensor([where[r] for r in rows]).to(self.source.device, non_blocking=True)  # (N,)
        return self.source._normalised(self.pixels), index
