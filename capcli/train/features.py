"""Where training gets its encoder features, behind one interface: the cache or the encoder itself.

- ``CachedFeatures`` (frozen encoder, the default): every image was encoded once into the run
  folder's cache; an epoch only reads rows. Batches are bucketed by caption length.
- ``EncodedImages`` (``--fine-tune-encoder``): the batch's images go through the encoder at every
  step, inside the forward that DDP wraps, so its unfrozen blocks learn. Batches are drawn by
  image, and each image's encoder output is shared by all of its captions.

Both give the training loop the same three things: the epoch's batches, a step's inputs, and
features for validation. Images that cannot be read are in ``bad`` (row -> reason); their
captions are left out of every batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from capcli.train.feature_cache import FeatureCache
from capcli.data.images import MAX_IMAGE_PIXELS, ImageError, image_batches, model_input
from capcli.model.config import ModelConfig


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


class StepInputs:
    """One step's images, loaded: ``usable`` says which rows can be trained on, ``for_captions``
    gives what the training net takes for captions whose images are ``rows`` (in caption order)."""

    def __init__(self, usable: set[int]):
        self.usable = usable

    def for_captions(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class CachedFeatures:
    fine_tunes_encoder = False

    def __init__(self, cache: FeatureCache, device: torch.device):
        self.cache, self.device = cache, device
        self.bad: dict[int, str] = dict(cache.bad)

    def batches(self, captions: CaptionSet, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        return length_bucketed_batches([len(t) for t in captions.tokens], batch_size, generator)

    def load(self, rows: list[int]) -> StepInputs:
        return _CachedInputs(self, {r for r in rows if r not in self.bad})

    def placeholder(self, row: int) -> StepInputs:
        """Inputs for a zero-weight step (a process left with no usable caption must still join DDP)."""
        return _CachedInputs(self, {row})  # a bad image's row of the cache holds zeros

    def rows_features(self, rows: list[int]) -> torch.Tensor:
        f = self.cache.features[torch.tensor(rows)]  # (N, L, D) fp16
        if self.device.type == "cuda":
            f = f.pin_memory()
        return f.to(self.device, non_blocking=True).float()

    @torch.no_grad()
    def features(self, rows: list[int]) -> tuple[torch.Tensor, list[bool]]:
        """Validation: features (n, L, D) of the usable ``rows``, and which rows they are."""
        ok = [r not in self.bad for r in rows]
        return self.rows_features([r for r, good in zip(rows, ok) if good]), ok


class _CachedInputs(StepInputs):
    def __init__(self, source: CachedFeatures, usable: set[int]):
        super().__init__(usable)
        self.source = source

    def for_captions(self, rows):
        return self.source.rows_features(rows), None  # (N, L, D)


class EncodedImages:
    fine_tunes_encoder = True

    def __init__(self, encoder: torch.nn.Module, paths: Sequence[Path], cfg: ModelConfig, device: torch.device,
                 workers: int, max_pixels: int = MAX_IMAGE_PIXELS):
        self.encoder, self.paths, self.cfg, self.device, self.workers = encoder, paths, cfg, device, workers
        self.max_pixels = max_pixels
        self.bad: dict[int, str] = {}  # found while training; kept in the training state for --resume

    def batches(self, captions: CaptionSet, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        """By image: every caption of an image in the same batch, so the encoder runs once for all."""
        by_image: dict[int, list[int]] = {}
        for i, img in enumerate(captions.image):
            by_image.setdefault(img, []).append(i)
        images = list(by_image)
        perm = torch.randperm(len(images), generator=generator).tolist()
        per_batch = max(1, batch_size // max(1, round(len(captions) / max(len(images), 1))))
        order = [images[i] for i in perm]
        return [[c for img in order[k:k + per_batch] for c in by_image[img]] for k in range(0, len(order), per_batch)]

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

    def for_captions(self, rows):
        """The distinct images (n_img, 3, S, S) and each caption's image among them (N,)."""
        where = {r: k for k, r in enumerate(self.pixels)}
        index = torch.tensor([where[r] for r in rows]).to(self.source.device, non_blocking=True)  # (N,)
        return self.source._normalised(self.pixels), index
