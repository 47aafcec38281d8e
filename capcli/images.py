"""Image files -> upright RGB pictures -> pixels, and threaded batch loading in input order.

Loader threads only decode and resize with Pillow; normalising happens per batch in the caller
(``normalize_pixels``), see ``image_batches`` for why.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}

MAX_IMAGE_PIXELS = 178_956_970  # Pillow's own bomb limit; larger images are refused, not decoded


class ImageError(Exception):
    """One image could not be used; the message says why (shown as ``capcli: PATH: reason``)."""


def load_image(path: str | Path, draft_size: int | None = None):
    """Open an image file as an RGB PIL image, whatever its mode, orientation or frame count.

    EXIF orientation is applied; grayscale, CMYK, palette, 16-bit and alpha images become RGB
    (transparency composited on white); animated images give their first frame. Raises
    ImageError with a one-line reason for anything that is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        # Image.open reads only the header; that is where Pillow warns of a decompression bomb.
        # catch_warnings changes process-wide state, so images opened in parallel threads
        # (image_batches) take turns here; the slow decoding below runs outside the lock.
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"image too large ({img.width}x{img.height} pixels)")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # decode at reduced scale: much faster
            img.seek(0)
            img.load()
            return to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(_unidentified_reason(path)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image too large (decompression bomb limit)") from None
    except OSError as e:
        reason = e.strerror or str(e) or e.__class__.__name__
        if e.strerror:
            reason = reason[:1].lower() + reason[1:]  # "Too many levels of symbolic links", as the other reasons
        if "truncated" in reason.lower() or "broken data stream" in reason.lower():
            reason = "truncated or corrupt image data"
        elif e.errno is None:  # Pillow's own terse words ("could not create decoder object")
            reason = f"corrupt or unsupported image ({reason})"
        raise ImageError(reason) from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as e:  # Pillow's plugins raise these on bad data
        raise ImageError(f"corrupt image ({e.__class__.__name__}: {e})") from None


_OPEN_LOCK = threading.Lock()


# Signatures of the common image formats: a file that starts like one but that Pillow cannot
# identify is a damaged image (cut off within its header), not some other kind of file.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def _unidentified_reason(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        head = b"?"
    if not head:
        return "empty file"
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "truncated or corrupt image data"
    return "not an image (unrecognised format)"


def to_rgb(img):
    """Any PIL image -> upright RGB (EXIF orientation applied, 16-bit scaled, alpha on white)."""
    from PIL import ImageOps

    return _mode_to_rgb(ImageOps.exif_transpose(img))


def _mode_to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        img = img.convert("I")
        lo, hi = img.getextrema()
        scale = 255.0 / max(hi - lo, 1)
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    elif img.mode == "F":
        lo, hi = img.getextrema()
        img = img.point(lambda v: (v - lo) * (255.0 / max(hi - lo, 1e-12))).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def image_to_pixels(img, size: int):
    """RGB PIL image -> (size, size, 3) uint8 tensor: the whole image, squashed, never cropped.

    Pillow does the work and torch only wraps the bytes, so this is safe in loader threads, which
    must not run torch arithmetic (see image_batches).
    """
    import torch
    from PIL import Image

    img = img.resize((size, size), Image.BICUBIC)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)  # (S, S, 3)


def normalize_pixels(pixels, mean: Sequence[float], std: Sequence[float]):
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float, (x / 255 - mean) / std, its memory channels last
    (the layout the encoder runs in)."""
    import torch

    scale = torch.tensor([1 / (255 * s) for s in std], device=pixels.device)  # (3,)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=pixels.device)  # (3,)
    return pixels.float().mul_(scale).add_(shift).permute(0, 3, 1, 2)  # (N, 3, S, S)


def image_to_tensor(img, size: int, mean: Sequence[float], std: Sequence[float]):
    """RGB PIL image -> normalised (3, size, size) float tensor."""
    return normalize_pixels(image_to_pixels(img, size)[None], mean, std)[0]  # (3, S, S)


def expand_paths(inputs: Iterable[str]) -> Iterator[Path]:
    """Yield image paths from files, directories (recursively, sorted) and '-' (paths on stdin).

    Explicit files are yielded whatever their suffix (they may fail to load later, and are then
    reported); inside directories only files with image suffixes are taken. Symbolic links are
    followed, each real directory visited once, so a link loop ends.
    """
    import sys

    for item in inputs:
        if item == "-":
            for line in sys.stdin:
                line = line.rstrip("\r\n")
                if line:
                    yield from expand_paths([line])
            continue
        path = Path(item)
        if path.is_dir():
            yield from _walk_images(path)
        else:
            yield path


def _walk_images(root: Path) -> list[Path]:
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return sorted(found)


def image_batches(
    paths: Iterable[Path],
    size: int,
    batch_size: int,
    workers: int = 2,
    overlap: bool = True,
) -> Iterator[list[tuple[Path, object]]]:
    """Load images in ``workers`` threads; yield batches of (path, (S, S, 3) uint8 pixels or
    ImageError), in input order. The caller normalises each batch (normalize_pixels).

    overlap=True (for a GPU, which leaves the CPU free): the next batch loads while the caller
    works on this one. overlap=False (on the CPU): a batch loads when it is asked for, and nothing
    loads while the caller computes. There the model already keeps every core busy; loader threads
    beside it made the encoder ~1.6x slower, for the little time they save (measured on 2 cores:
    beam 3 went from 0.6x to 0.8x of the encoder-only bound). Loader threads never run torch
    arithmetic: a thread that does gets its own OpenMP team, and those extra threads slowed every
    model operation about as much, even while the loaders sat idle.
    At most two batches are in memory: a folder of any size streams in bounded memory.
    """
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    def work(path: Path):
        try:
            return image_to_pixels(load_image(path, draft_size=size), size)
        except ImageError as e:
            return e

    source = iter(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="capcli-images") as pool:
        def submit() -> list:
            return [(path, pool.submit(work, path)) for path in islice(source, batch_size)]

        pending = submit()
        while pending:
            upcoming = submit() if overlap else None
            yield [(path, future.result()) for path, future in pending]
            pending = upcoming if overlap else submit()
