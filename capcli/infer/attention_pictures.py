"""The Show-Attend-Tell figure: one panel per generated token, the image lit where that token looked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from capcli.files import atomic_write

PANEL = 224  # longest side of one panel, in pixels
LABEL = 22  # height of the strip under a panel that holds its word
COLUMNS = 5  # up to 20 tokens; longer outputs (characters, SMILES) get more columns of the same panels


def render(image, words: Sequence[str], attention, panel: int = PANEL, columns: int | None = None):
    """RGB PIL image + tokens + attention (T, h, w) -> one PIL image, a grid of len(words) panels."""
    from PIL import Image, ImageDraw, ImageFont

    scale = panel / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    base = image.convert("RGB").resize((w, h), Image.BICUBIC)
    n = len(words)
    if columns is None:
        columns = COLUMNS if n <= 4 * COLUMNS else math.ceil(math.sqrt(n * 1.5))  # about 3:2 landscape
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    sheet = Image.new("RGB", (cols * w, rows * (h + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    dark = Image.new("RGB", (w, h), (0, 0, 0))
    for i, word in enumerate(words):
        a = attention[i].float()  # (h, w)
        # In proportion to the strongest cell: uniform attention lights the whole scene, a peaked one
        # its peak (a min-max stretch would turn near-uniform attention into dark noise).
        a = a / a.max().clamp_min(1e-12)
        mask = Image.frombytes("L", (a.size(1), a.size(0)), bytes((a * 255).round().byte().flatten().tolist()))
        mask = mask.resize((w, h), Image.BILINEAR).point(lambda v: 40 + v * 215 // 255)  # the scene stays faintly visible
        x, y = (i % cols) * w, (i // cols) * (h + LABEL)
        sheet.paste(Image.composite(base, dark, mask), (x, y))
        label = word.replace(" ", "\u2423")  # a space token shows as ␣
        draw.text((x + w // 2, y + h + LABEL // 2), label, fill="black", font=font, anchor="mm")
    return sheet


def save(path: str | Path, image, caption: str, words: Sequence[str], attention) -> Path:
    """Render and write a PNG; text chunks hold the caption (``capcli:caption``) and its tokens, one
    per panel, as a JSON list (``capcli:tokens``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("capcli:caption", caption)
    info.add_text("capcli:tokens", json.dumps(list(words), ensure_ascii=False))
    sheet = render(image, words, attention)
    atomic_write(Path(path), lambda tmp: sheet.save(tmp, format="PNG", pnginfo=info))
    return Path(path)
