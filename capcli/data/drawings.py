"""Molecules drawn on the fly: a table of SMILES -> ``Drawing``s that RDKit draws when they are loaded.

A molecule dataset of 10^5-10^6 drawings need not be 10^6 image files. ``molecules.csv`` lists what
to draw, a row per drawing (columns, in any order; only ``smiles`` is required):

    smiles   the molecule, drawn, and the caption to learn
    split    train | val | test (empty: split by a hash of the SMILES: a molecule's drawings share a split)
    size     pixels of RDKit's default depiction (default 300); ignored by augmented drawings
    augment  empty: RDKit's default depiction; a whole number: the seed of a varied drawing
             (layout, rotation, line width, fonts, padding, blur, noise), the same on every machine
             with the same RDKit
    name     what results and errors call the drawing (default: made from the other columns)

The loader draws each when it is needed (about 8-12 ms each), and the feature cache encodes each
drawing once. Needs RDKit: ``pip install 'capcli[chem]'``.
"""

from __future__ import annotations

import csv
import io
import random
import threading
from dataclasses import dataclass
from pathlib import Path

from capcli.errors import CapcliError

DRAWING_TABLE = "molecules.csv"  # the file that makes a data folder a table of drawings
DEFAULT_DRAWING_SIZE = 300
SIZE_RANGE = (32, 2048)  # a size outside is refused before anything is allocated
_COLUMNS = ("smiles", "split", "size", "augment", "name")

# RDKit's choice of depictor (CoordGen or its own) is a process-wide setting that an augmented
# drawing changes: drawings are made one at a time, so each is the same whatever ran beside it.
_RDKIT_SETTINGS = threading.Lock()


class DrawingError(Exception):
    """A drawing RDKit cannot make (e.g. its SMILES does not parse): a bad image, not a bad table."""


@dataclass(frozen=True, slots=True)
class Drawing:
    name: str
    smiles: str
    size: int = DEFAULT_DRAWING_SIZE
    augment: int | None = None  # None: RDKit's default depiction; else the seed of a varied drawing

    def __str__(self) -> str:
        return self.name

    def render(self):
        """The drawing as an RGB PIL image; DrawingError if RDKit cannot draw it."""
        with _RDKIT_SETTINGS:
            image = default_depiction(self.smiles, self.size) if self.augment is None else augmented(self.smiles, self.augment)
        return image.convert("RGB")


def _molecule(smiles: str):
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # a bad SMILES is reported once, by the caller, not by RDKit's log
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        raise DrawingError(f"RDKit cannot parse the SMILES {smiles!r}")
    return mol


def _prefer_coordgen(on: bool) -> None:
    from rdkit.Chem import rdDepictor

    if hasattr(rdDepictor, "SetPreferCoordGen"):
        rdDepictor.SetPreferCoordGen(on)


def default_depiction(smiles: str, size: int = DEFAULT_DRAWING_SIZE):
    """RDKit's default depiction, ``Draw.MolToImage`` at size x size."""
    from rdkit.Chem import Draw

    mol = _molecule(smiles)
    _prefer_coordgen(False)  # an augmented drawing may have turned it on
    return Draw.MolToImage(mol, size=(size, size))


def augmented(smiles: str, seed: int):
    """One varied drawing of the molecule, fixed by ``seed``; the molecule (so its caption) is unchanged."""
    import numpy as np
    from PIL import Image, ImageFilter
    from rdkit import Chem
    from rdkit.Chem import rdDepictor
    from rdkit.Chem.Draw import rdMolDraw2D

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    mol = _molecule(smiles)
    if rng.random() < 0.6:
        # The depictor's layout depends on atom order: a random renumbering (same molecule, same
        # canonical SMILES) and sometimes CoordGen instead of RDKit's own depictor vary the layout.
        mol = Chem.RenumberAtoms(mol, rng.sample(range(mol.GetNumAtoms()), mol.GetNumAtoms()))
        _prefer_coordgen(rng.random() < 0.5)
        rdDepictor.Compute2DCoords(mol, canonOrient=rng.random() < 0.5)
    else:
        _prefer_coordgen(False)
    w = h = rng.randint(200, 520)
    if rng.random() < 0.3:  # not always square
        h = max(200, min(520, int(w * rng.uniform(0.75, 1.33))))
    d = rdMolDraw2D.MolDraw2DCairo(w, h)
    o = d.drawOptions()
    o.rotate = rng.uniform(0, 360)
    o.bondLineWidth = rng.uniform(1, 4)
    o.minFontSize = rng.randint(6, 12)  # floor/ceiling on label size in pixels (defaults 6 and 40)
    o.maxFontSize = rng.randint(20, 40)
    o.baseFontSize = rng.uniform(0.45, 0.9)  # label size relative to bond length
    o.padding = rng.uniform(0.02, 0.12)  # varies how much of the canvas the molecule fills
    o.multipleBondOffset = rng.uniform(0.1, 0.2)
    if rng.random() < 0.3:
        o.useBWAtomPalette()
    rdMolDraw2D.PrepareAndDrawMolecule(d, mol)
    d.FinishDrawing()
    img = Image.open(io.BytesIO(d.GetDrawingText())).convert("RGB")
    if rng.random() < 0.2:  # a slightly soft image: blur, or detail lost to a downscale
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
        else:
            f = rng.uniform(0.5, 0.8)
            img = img.resize((int(w * f), int(h * f)), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.3:
        a = np.asarray(img, dtype=np.float32) + nrng.normal(0, rng.uniform(5, 15), (h, w, 1))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return img


def require_rdkit(source: str) -> None:
    try:
        import rdkit  # noqa: F401
    except ImportError:
        raise CapcliError(f"{source}: drawing molecules needs RDKit: pip install 'capcli[chem]'") from None


def read_drawing_table(path: Path, text: str, delimiter: str = ",") -> list[tuple[Drawing, str | None]]:
    """(drawing, split or None) for each row of the table ``text`` read from ``path`` (CSV, or TSV
    with ``delimiter`` a tab); a bad row is a CapcliError naming the file and line. Rows repeating an
    earlier drawing are dropped."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True, skipinitialspace=True)
    try:
        return _drawings(path, rows)
    except csv.Error as e:
        raise CapcliError(f"{path}:{rows.line_num}: malformed {kind} ({e})") from None


def _drawings(path: Path, rows) -> list[tuple[Drawing, str | None]]:
    header = [c.strip().lower() for c in next(rows, [])]
    if "smiles" not in header:
        raise CapcliError(f"{path}: no 'smiles' column in the header (columns: {', '.join(_COLUMNS)})")
    at = {c: header.index(c) for c in _COLUMNS if c in header}
    drawings: dict[str, tuple[Drawing, str | None]] = {}
    for line, row in enumerate(rows, 2):
        if not any(cell.strip() for cell in row):
            continue

        def cell(column: str) -> str:
            k = at.get(column)
            return row[k].strip() if k is not None and k < len(row) else ""

        smiles = cell("smiles")
        if not smiles:
            raise CapcliError(f"{path}:{line}: empty SMILES")
        size = _whole(path, line, "size", cell("size"), *SIZE_RANGE) if cell("size") else DEFAULT_DRAWING_SIZE
        augment = _whole(path, line, "augment", cell("augment"), 0, 2**64 - 1) if cell("augment") else None
        name = cell("name") or (f"{smiles} augmented {augment}" if augment is not None else f"{smiles} {size}px")
        drawing = Drawing(name, smiles, size, augment)
        if name in drawings and drawings[name][0] != drawing:
            raise CapcliError(f"{path}:{line}: the name {name!r} is given to two different drawings")
        drawings.setdefault(name, (drawing, cell("split") or None))
    if not drawings:
        raise CapcliError(f"{path}: no drawings in the table")
    return list(drawings.values())


def _whole(path: Path, line: int, column: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise CapcliError(f"{path}:{line}: {column} {text!r} is not a whole number in {low}..{high}")
    return value
