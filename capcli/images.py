"""Image files and URLs -> upright RGB pictures -> pixels, and threaded batch loading in input order.

Loader threads only decode and resize with Pillow; normalising happens per batch in the caller
(``normalize_pixels``), see ``image_batches`` for why.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from capcli import __version__

log = logging.getLogger("capcli")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}

# Pillow's hard limit (2x its Image.MAX_IMAGE_PIXELS, which only warns): larger images are refused,
# from their header, before anything is decoded. 0 means no limit.
MAX_IMAGE_PIXELS = 178_956_970

URL_TIMEOUT = 30.0  # seconds for a whole download
URL_MAX_BYTES = 50 * 1024 * 1024
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: C:// is a Windows drive


class ImageError(Exception):
    """One image could not be used; the message says why (shown as ``capcli: PATH: reason``)."""


def is_url(item) -> bool:
    """A string that starts with a scheme (https://...); Path objects are always files."""
    return isinstance(item, str) and _URL.match(item) is not None


def load_image(source: str | Path, draft_size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open an image file or http(s) URL as an RGB PIL image, whatever its mode, orientation or
    frame count.

    EXIF orientation is applied; grayscale, CMYK, palette, 16-bit and alpha images become RGB
    (transparency composited on white); animated images give their first frame. JPEGs are decoded
    at the smallest scale (1/2, 1/4, 1/8) still at least ``draft_size`` pixels on each side. Images
    over ``max_pixels`` (0: no limit) are refused from their header. Raises ImageError with a
    one-line reason for anything that is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    if is_url(source):
        data = fetch_url(source)
        fp, head = io.BytesIO(data), data[:16]
    else:
        fp = Path(source)
        head = None
    try:
        img = _open(fp)
        with img:
            if max_pixels and img.width * img.height > max_pixels:
                raise ImageError(f"image too large ({img.width}x{img.height} pixels, more than the limit of "
                                 f"{max_pixels}; see --max-image-pixels)")
            if draft_size:
                img.draft("RGB", (draft_size, draft_size))  # JPEG only (a no-op for others); before load()
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
        raise ImageError(_unidentified_reason(head if head is not None else _file_head(fp))) from None
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


_OPEN_LOCK = threading.Lock()


def _open(fp: Path | io.BytesIO):
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


def _open_unchecked(fp: Path | io.BytesIO):
    """Image.open's own loop over the registered formats, minus its size check."""
    from PIL import Image, UnidentifiedImageError

    prefix = fp.getvalue()[:16] if isinstance(fp, io.BytesIO) else _file_head(fp)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        accepted = accept(prefix) if accept else True
        if accepted and not isinstance(accepted, str):  # a str is Pillow's "almost, but no"
            try:
                if isinstance(fp, io.BytesIO):
                    fp.seek(0)
                return factory(fp)
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError(f"cannot identify image file {fp!r}")


def fetch_url(url: str) -> bytes:
    """Download an http(s) URL into memory: at most URL_MAX_BYTES, within about URL_TIMEOUT seconds."""
    import http.client
    import urllib.error
    import urllib.request

    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"unsupported URL scheme {scheme}:// (http and https only)")
    too_large = ImageError(f"larger than {URL_MAX_BYTES / 2**20:g} MB")
    timed_out = ImageError(f"timed out after {URL_TIMEOUT:g} s")
    request = urllib.request.Request(url, headers={"User-Agent": f"capcli/{__version__}"})
    deadline = time.monotonic() + URL_TIMEOUT  # the socket timeout is per read; this bounds the whole
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > URL_MAX_BYTES:
                raise too_large
            chunks, total = [], 0
            while chunk := response.read(1 << 16):
                total += len(chunk)
                if total > URL_MAX_BYTES:
                    raise too_large
                if time.monotonic() > deadline:
                    raise timed_out
                chunks.append(chunk)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:  # refused, unknown host, TLS: no response at all
        if isinstance(e.reason, TimeoutError):
            raise timed_out from None
        reason = getattr(e.reason, "strerror", None) or str(e.reason)
        raise ImageError(f"cannot connect: {reason[:1].lower() + reason[1:]}") from None
    except TimeoutError:
        raise timed_out from None
    except (http.client.InvalidURL, ValueError) as e:  # spaces, a bad port
        raise ImageError(f"invalid URL ({e})") from None
    except (http.client.HTTPException, OSError) as e:  # cut off mid-way
        raise ImageError(f"download failed ({e.__class__.__name__}: {e})") from None
    if not chunks:
        raise ImageError("empty response")
    return b"".join(chunks)


# Signatures of the common image formats: a file that starts like one but that Pillow cannot
# identify is a damaged image (cut off within its header), not some other kind of file.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def _file_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError:
        return b"?"


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


def expand_paths(inputs: Iterable[str]) -> Iterator[Path | str]:
    """Yield image paths from files, directories (recursively, sorted) and '-' (paths on stdin);
    URLs (https://...) are yielded as they are, strings.

    Explicit files are yielded whatever their suffix (they may fail to load later, and are then
    reported), as Paths; inside directories only files with image suffixes are taken, as strings
    (see walk_images). Symbolic links are followed, each real directory visited once, so a link
    loop ends.
    """
    import sys

    for item in inputs:
        if item == "-":
            for line in sys.stdin:
                line = line.rstrip("\r\n")
                if line:
                    yield from expand_paths([line])
            continue
        if is_url(item):
            yield item  # never Path(item): that turns https://host into https:/host
            continue
        path = Path(item)
        if path.is_dir():
            yield from walk_images(path)
        else:
            yield path


def walk_images(root: Path) -> Iterator[str]:
    """The image files under ``root`` as path strings, in the order ``sorted()`` of their Paths
    would give, found as the walk goes: a folder's entries sorted by name, a subfolder's files
    where its name sorts. Nothing is held but the folders on the way down, so listing a folder of
    10^6 files into a list costs the strings and no more."""
    visited: set[str] = set()

    def walk(directory: str) -> Iterator[str]:
        real = os.path.realpath(directory)
        if real in visited:  # a symbolic link back up the tree
            return
        visited.add(real)
        try:
            with os.scandir(directory) as it:
                entries = sorted((e.name, _is_dir(e)) for e in it)
        except OSError as e:
            log.warning("%s: cannot list (%s); skipped", directory, e.strerror or e)
            return
        for name, is_dir in entries:
            path = os.path.join(directory, name)
            if is_dir:
                yield from walk(path)
            elif os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield path

    yield from walk(str(root))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symbolic link that loops: a file that will fail to load, and say why
        return False


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
                return image_to_pixels(to_rgb(item), size)
            return image_to_pixels(load_image(item, draft_size=size, max_pixels=max_pixels), size)
        except ImageError as e:
            return e

    source = iter(images)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="capcli-images") as pool:
        def submit() -> list:
            return [(item, pool.submit(work, item)) for item in islice(source, batch_size)]

        pending = submit()
        while pending:
            upcoming = submit() if overlap else None
            yield [(item, future.result()) for item, future in pending]
            pending = upcoming if overlap else submit()
