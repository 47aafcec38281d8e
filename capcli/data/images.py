"""Image files, URLs and molecule drawings -> upright RGB pictures -> pixels, and threaded batch loading in input order.

Loader threads only decode and resize with Pillow; normalising happens per batch in the caller
(``normalize_pixels``), see ``image_batches`` for why. Downloads are data.urls's work, which files
and folders a run is given data.listing's.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import threading
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from capcli.data.drawings import Drawing, DrawingError
from capcli.data.urls import DownloadError, fetch_url, is_url

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}

# Pillow's hard limit (2x its Image.MAX_IMAGE_PIXELS, which only warns): larger images are refused,
# from their header, before anything is decoded. 0 means no limit.
MAX_IMAGE_PIXELS = 178_956_970

# Decoded images with more pixels than this are box-reduced towards the size the model needs before
# their mode is converted: each conversion is a full-size copy (a 13000x13000 RGBA PNG took 2.1 GB, now 0.7).
SHRINK_ABOVE_PIXELS = 4096 * 4096

# An image given as a URL: the limits load_image passes to fetch_url.
URL_TIMEOUT = 30.0  # seconds for a whole download
URL_MAX_BYTES = 50 * 1024 * 1024


class ImageError(Exception):
    """One image could not be used; the message says why (shown as ``capcli: PATH: reason``)."""


def load_image(source: str | Path | Drawing, draft_size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open an image file or http(s) URL as an RGB PIL image, whatever its mode, orientation or
    frame count; or draw a molecule ``Drawing``.

    EXIF orientation is applied; grayscale, CMYK, palette, 16-bit and alpha images become RGB
    (transparency composited on white); animated images give their first frame. JPEGs are decoded
    at the smallest scale (1/2, 1/4, 1/8) still at least ``draft_size`` pixels on each side, and
    any image still over SHRINK_ABOVE_PIXELS is reduced towards that size (see _shrink). Images
    over ``max_pixels`` (0: no limit) are refused from their header; anything but a regular file
    (a FIFO, a device) is refused unopened. Raises ImageError with a one-line reason for anything
    that is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Drawing):
        try:
            return source.render()
        except DrawingError as e:
            raise ImageError(str(e)) from None
    fp = None
    try:
        if is_url(source):
            fp = io.BytesIO(fetch_url(source, timeout=URL_TIMEOUT, max_bytes=URL_MAX_BYTES))
        else:
            fp = _open_regular_file(source)
        with _open(fp) as img:
            if max_pixels and img.width * img.height > max_pixels:
                raise ImageError(f"image too large ({img.width}x{img.height} pixels, more than the limit of "
                                 f"{max_pixels}; see --max-image-pixels)")
            if draft_size:
                img.draft("RGB", (draft_size, draft_size))  # JPEG only (a no-op for others); before load()
            img.load()
            return to_rgb(_shrink(img, draft_size) if draft_size else img)
    except ImageError:
        raise
    except DownloadError as e:
        raise ImageError(str(e)) from None
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(_unidentified_reason(_head(fp))) from None
    except Image.DecompressionBombError:  # a frame or tile over Pillow's own limit, met while decoding
        raise ImageError("image too large for Pillow (see PIL.Image.MAX_IMAGE_PIXELS)") from None
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
    finally:
        if fp is not None:
            fp.close()


def _open_regular_file(path: str | Path) -> io.BufferedReader:
    """Open a local file for reading; ImageError unless it is a regular file. A FIFO would block
    the open (and the run) until something writes to it, a device such as /dev/zero never ends."""
    try:
        kind = os.stat(path).st_mode  # before opening: opening some devices has effects
    except ValueError:  # os.stat's word for a name with a NUL byte in it
        raise ImageError("not a file name (it has a NUL byte)") from None
    if stat.S_ISDIR(kind):
        raise ImageError("is a directory")
    if not stat.S_ISREG(kind):
        raise ImageError("not a regular file")
    # Non-blocking, should it have become a FIFO since: then the open returns at once and fstat says so.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError("not a regular file")
    return open(fd, "rb")  # O_NONBLOCK changes nothing for regular files


def _head(fp) -> bytes:
    """The first bytes of an open image file, to say what it is when Pillow cannot."""
    try:
        fp.seek(0)
        return fp.read(16)
    except (OSError, ValueError):
        return b"?"


def _shrink(img, size: int):
    """A decoded image of more than SHRINK_ABOVE_PIXELS reduced by an integer factor (the mean of
    each box of pixels) to at least ``size`` pixels on each side, in its own mode; others as they are.
    Reduced a strip of rows at a time: Pillow reduces RGBA through a premultiplied full-size copy."""
    from PIL import Image

    factor = min(img.size) // size
    if img.width * img.height <= SHRINK_ABOVE_PIXELS or factor < 2 or img.mode in ("1", "P"):
        return img  # 1-bit and palette images cannot be averaged; they are converted as before
    small = Image.new(img.mode, (-(-img.width // factor), -(-img.height // factor)))  # rounded up, as reduce()
    rows = factor * max(1, 4_000_000 // (img.width * factor))  # whole boxes, about 4M pixels a strip
    for top in range(0, img.height, rows):
        strip = img.crop((0, top, img.width, min(top + rows, img.height)))
        if strip.mode.startswith("I;16"):  # reduce() does not take 16-bit modes; a box resize does the same
            strip = strip.resize((-(-strip.width // factor), -(-strip.height // factor)), Image.BOX)
        else:
            strip = strip.reduce(factor)
        small.paste(strip, (0, top // factor))
    small.info = dict(img.info, exif=img.getexif().tobytes())  # the orientation: a TIFF's is in the file, not in info
    return small


_OPEN_LOCK = threading.Lock()


def _open(fp: io.BufferedIOBase):
    """Image.open (reads only the header), without Pillow's size limits: load_image checks the
    size itself, per call, where Pillow's limit is one setting for the whole process."""
    from PIL import Image

    # catch_warnings changes process-wide state, so images opened in parallel threads
    # (image_batches) take turns here; the slow decoding runs outside the lock.
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(fp)
        except Image.DecompressionBombError:  # over Pillow's hard limit: open it as Image.open would, unchecked
            return _open_unchecked(fp)


def _open_unchecked(fp: io.BufferedIOBase):
    """Image.open's own loop over the registered formats, minus its size check."""
    from PIL import Image, UnidentifiedImageError

    prefix = _head(fp)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        accepted = accept(prefix) if accept else True
        if accepted and not isinstance(accepted, str):  # a str is Pillow's "almost, but no"
            try:
                fp.seek(0)
                return factory(fp)
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError(f"cannot identify image file {fp!r}")


# Signatures of the common image formats: a file that starts like one but that Pillow cannot
# identify is a damaged image (cut off within its header), not some other kind of file.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def _unidentified_reason(head: bytes) -> str:
    if not head:
        return "empty file"
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "truncated or corrupt image data"
    return "not an image (unrecognised format)"


def to_rgb(img):
    """Any PIL image -> upright RGB (EXIF orientation applied, 16-bit scaled, alpha on white)."""
    from PIL import ImageOps

    return _mode_to_rgb(ImageOps.exif_transpose(img))


def given_to_rgb(img):
    """A PIL image a caller passed (not read by load_image) -> RGB, or ImageError saying why that
    one image cannot be used, so that it fails alone and not the batch it came in."""
    if img.width == 0 or img.height == 0:
        raise ImageError(f"empty image ({img.width}x{img.height} pixels)")
    try:
        return to_rgb(img)
    except Exception as e:  # anything Pillow raises about this image: lazily opened and truncated, an odd mode
        raise ImageError(f"cannot use this {img.mode} image ({e.__class__.__name__}: {e})") from None


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
    if img.mode == "La":  # premultiplied, which Pillow converts only to LA
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
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


def model_input(pixels: Sequence, device, mean: Sequence[float], std: Sequence[float]):
    """A batch of (S, S, 3) uint8 pixels -> the encoder's (N, 3, S, S) input on ``device``: moved as
    uint8 (a quarter of the bytes of floats; from pinned memory to a GPU), normalised there."""
    import torch

    x = torch.stack(list(pixels))  # (N, S, S, 3) uint8
    if torch.device(device).type == "cuda":
        x = x.pin_memory()
    return normalize_pixels(x.to(device, non_blocking=True), mean, std)  # (N, 3, S, S)


def image_to_tensor(img, size: int, mean: Sequence[float], std: Sequence[float]):
    """RGB PIL image -> normalised (3, size, size) float tensor."""
    return normalize_pixels(image_to_pixels(img, size)[None], mean, std)[0]  # (3, S, S)


def image_batches(
    images: Iterable,
    size: int,
    batch_size: int,
    workers: int = 2,
    overlap: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Iterator[list[tuple[object, object]]]:
    """Load images (paths, URLs or PIL images) in ``workers`` threads; yield batches of (the item
    as given, (S, S, 3) uint8 pixels or ImageError), in input order. The caller normalises each
    batch (normalize_pixels).

    overlap=True (for a GPU, which leaves the CPU free): the next batch loads while the caller
    works on this one. overlap=False (on the CPU): a batch loads when it is asked for, and nothing
    loads while the caller computes, since the model already keeps every core busy. Loader threads
    never run torch arithmetic: a thread that does gets its own OpenMP team, which slows every model
    operation (docs/performance-notes.md has the measurements). At most two batches are in memory:
    a folder of any size streams in bounded memory.
    """
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    from PIL import Image

    def work(item):
        try:
            if isinstance(item, Image.Image):
                return image_to_pixels(given_to_rgb(item), size)
            return image_to_pixels(load_image(item, draft_size=size, max_pixels=max_pixels), size)
        except ImageError as e:
            return e

    source = iter(images)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="capcli-images")
    try:
        def submit() -> list:
            return [(item, pool.submit(work, item)) for item in islice(source, batch_size)]

        pending = submit()
        while pending:
            upcoming = submit() if overlap else None
            yield [(item, future.result()) for item, future in pending]
            pending = upcoming if overlap else submit()
    finally:
        # Stopped early (Ctrl-C, an error, the caller's break): drop the images not started rather
        # than load every queued one first; those loading finish on their own (a download within URL_TIMEOUT).
        pool.shutdown(wait=False, cancel_futures=True)
