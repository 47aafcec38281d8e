"""Sidecar files (--sidecar .txt): the caption of each image in a text file beside it, or in a
mirrored tree under --sidecar-dir. Written atomically, so a sidecar is there whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from capcli.data.images import IMAGE_SUFFIXES
from capcli.data.urls import is_url
from capcli.errors import CapcliError
from capcli.files import atomic_write_bytes


class Sidecars:
    """A text file per image: ``a/b/photo.jpg`` -> ``a/b/photo.txt`` beside it, or under
    ``directory`` mirroring the tree below the folder it was found in (``roots``).

    An existing sidecar is kept (``wanted`` is False, so the image is not even read) unless
    ``overwrite``. A sidecar belongs to the first image of the run that maps to it, which writes it
    or keeps it as it was; another image that maps to it (photo.png beside photo.jpg) fails, in this
    run and in every later one, rather than take the first one's caption."""

    def __init__(self, suffix: str, directory: Path | None, roots: Iterable[str], overwrite: bool):
        suffix = suffix if suffix.startswith(".") else "." + suffix
        if suffix == "." or "/" in suffix or os.sep in suffix:
            raise CapcliError(f"--sidecar {suffix!r}: expected an extension such as .txt")
        if suffix.lower() in image_extensions():
            raise CapcliError(f"--sidecar {suffix}: that is an image extension; sidecars would replace images")
        if directory is not None:
            writable_folder(directory, "--sidecar-dir")
        self.suffix, self.directory, self.overwrite = suffix, directory, overwrite
        self.roots = [os.path.join(os.path.normpath(r), "") for r in roots]  # "photos/": prefixes of the paths found there
        # hash() of each sidecar an image of this run has taken: 10^7 images hold ints, not paths. Two
        # sidecars with one hash (odds ~10^-6 at 10^7) fail the second image; nothing is overwritten.
        self.taken: set[int] = set()

    def path(self, image: str) -> Path:
        """Where the sidecar of ``image`` (a local path) goes; CapcliError if it has none."""
        if is_url(image):
            raise CapcliError("a URL has no folder for a sidecar file")
        if os.path.splitext(image)[1].lower() == self.suffix.lower():
            raise CapcliError(f"its sidecar would have its own extension {self.suffix}, and replace it")
        if self.directory is None:
            return Path(image).with_suffix(self.suffix)
        relative = os.path.normpath(image)
        for root in self.roots:
            if relative.startswith(root):
                relative = relative[len(root):]
                break
        relative = os.path.splitdrive(relative)[1].lstrip(os.sep)
        if relative.split(os.sep)[0] == "..":
            raise CapcliError(f"cannot mirror a path outside the working folder under --sidecar-dir {self.directory}")
        return (self.directory / relative).with_suffix(self.suffix)

    def wanted(self, image: str) -> bool:
        """Does ``image`` still need its sidecar? (A URL does, to be reported as a failure.)"""
        try:
            sidecar = self.path(image)
        except CapcliError:
            return True
        key = hash(str(sidecar))
        if self.overwrite or key in self.taken or not sidecar.exists() or sidecar.is_dir():
            return True  # written, or reported as a failure (another image's sidecar, a folder)
        self.taken.add(key)  # kept as it is, as this image's
        return False

    def write(self, image: str, text: str) -> bool:
        """Write the sidecar atomically; False when one appeared meanwhile and may not be replaced."""
        sidecar = self.path(image)
        key = hash(str(sidecar))
        if key in self.taken:
            raise CapcliError(f"its sidecar {sidecar} belongs to another image of this run "
                              f"(same name, other extension); rename one of them")
        if sidecar.is_dir():
            raise CapcliError(f"its sidecar {sidecar} is a folder")
        self.taken.add(key)
        if sidecar.exists() and not self.overwrite:
            return False
        atomic_write_bytes(sidecar, (text + "\n").encode("utf-8"))
        return True


def writable_folder(folder: Path, option: str) -> None:
    """Make ``folder`` (given as ``option``) if need be; CapcliError, before any image is read,
    if it cannot be made or written in."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only, no permission, a file where a folder should be
        raise CapcliError(f"{folder}: cannot make the {option} folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):  # a read-only filesystem says so even to root
        raise CapcliError(f"{folder}: cannot write in the {option} folder")


def image_extensions() -> set[str]:
    """Extensions of files that are images: capcli's, and every one Pillow can open (.jfif, .apng...)."""
    from PIL import Image

    return IMAGE_SUFFIXES | {e.lower() for e in Image.registered_extensions()}
