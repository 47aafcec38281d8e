"""Training curves (loss, selection metric, learning rate per epoch) drawn into a PNG with Pillow."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from capcli.metrics.validation import METRIC_LABELS

WIDTH, HEIGHT = 1200, 400
FONT_SIZE = 14
# Drawn at twice the size and box-filtered down: Pillow draws lines without anti-aliasing.
SUPERSAMPLE = 2

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (30, 30, 30)
MUTED_COLOUR = (120, 120, 120)
AXIS_COLOUR = (90, 90, 90)
GRID_COLOUR = (228, 228, 228)
TRAIN_COLOUR = (31, 119, 180)
VAL_COLOUR = (255, 127, 14)
METRIC_COLOUR = (44, 160, 44)
BEST_COLOUR = (214, 39, 40)
LR_COLOUR = (148, 103, 189)



def render_curves(records: list[dict], selection_metric: str = "val_bleu4") -> Image.Image:
    """Three panels side by side: train/val loss, the selection metric with its best epoch, learning rate."""
    rows = _by_epoch(records)
    font, scale = _load_font()
    canvas = _Canvas(Image.new("RGB", (WIDTH * scale, HEIGHT * scale), BACKGROUND), font, scale)
    width = WIDTH // 3

    loss = [("train", TRAIN_COLOUR, _series(rows, "train_loss")), ("val", VAL_COLOUR, _series(rows, "val_loss"))]
    _draw_panel(canvas, (0, 0, width, HEIGHT), "loss", loss, legend=True)

    metric = _series(rows, selection_metric)
    title = METRIC_LABELS.get(selection_metric, selection_metric)
    _draw_panel(canvas, (width, 0, 2 * width, HEIGHT), title, [(title, METRIC_COLOUR, metric)], mark_best=True,
                headroom=0.15)

    lr = _series(rows, "lr")
    values = [v for _, v in lr]
    log = bool(values) and min(values) > 0 and max(values) > 2 * min(values)
    _draw_panel(canvas, (2 * width, 0, WIDTH, HEIGHT), "learning rate" + (" (log scale)" if log else ""),
                [("lr", LR_COLOUR, lr)], log=log, fmt=_sci)

    image = canvas.image
    if scale != 1:
        image = image.resize((WIDTH, HEIGHT), Image.Resampling.BOX)
    return image


def save_curves(path, records, selection_metric: str = "val_bleu4", write=None) -> None:
    """Render and write a PNG; ``write(path, fn)``, when given, calls ``fn(tmp_path)`` and renames atomically."""
    image = render_curves(records, selection_metric)
    if write is None:
        image.save(path, format="PNG")
    else:
        write(path, lambda tmp: image.save(tmp, format="PNG"))


def _by_epoch(records) -> list[dict]:
    """One record per epoch, in epoch order; a replayed epoch (resumed after a crash) keeps its last record."""
    latest = {}
    for record in records:
        if isinstance(record, dict):
            epoch = _as_epoch(record.get("epoch"))
            if epoch is not None:
                latest[epoch] = record
    return [latest[epoch] for epoch in sorted(latest)]


def _as_epoch(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(epoch, value) for the rows where ``key`` holds a finite number; missing, None, NaN and flags are skipped."""
    points = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            points.append((_as_epoch(row["epoch"]), float(value)))
    return points


def _load_font():
    """The font and the supersampling factor it allows: the old fixed-size bitmap font cannot scale up."""
    try:
        font = ImageFont.load_default(size=FONT_SIZE * SUPERSAMPLE)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default(), 1
    except ImportError:  # Pillow built without FreeType
        return ImageFont.load_default(), 1
    return font, SUPERSAMPLE if isinstance(font, ImageFont.FreeTypeFont) else 1


class _Canvas:
    """ImageDraw in output pixels: coordinates and sizes are multiplied by the supersampling factor here."""

    def __init__(self, image: Image.Image, font, scale: int):
        self.image, self.font, self.scale = image, font, scale
        self.draw = ImageDraw.Draw(image)

    def text_size(self, text: str) -> tuple[float, float]:
        left, top, right, bottom = self.draw.textbbox((0, 0), text, font=self.font)
        return (right - left) / self.scale, (bottom - top) / self.scale

    def text(self, x, y, text, fill=TEXT_COLOUR, ha="left", va="top") -> None:
        # Placed by the ink's bounding box rather than by anchors, which bitmap fonts do not support.
        left, top, right, bottom = self.draw.textbbox((0, 0), text, font=self.font)
        w, h = right - left, bottom - top
        x, y = x * self.scale, y * self.scale
        x -= {"left": 0, "center": w / 2, "right": w}[ha]
        y -= {"top": 0, "center": h / 2, "bottom": h}[va]
        self.draw.text((round(x - left), round(y - top)), text, font=self.font, fill=fill)

    def line(self, points, fill, width=1.0) -> None:
        s = self.scale
        self.draw.line([(x * s, y * s) for x, y in points], fill=fill, width=max(1, round(width * s)), joint="curve")

    def rect(self, x0, y0, x1, y1, fill=None, outline=None, width=1.0) -> None:
        s = self.scale
        self.draw.rectangle((x0 * s, y0 * s, x1 * s, y1 * s), fill=fill, outline=outline,
                            width=max(1, round(width * s)))

    def dot(self, x, y, radius, fill=None, outline=None, width=1.0) -> None:
        s = self.scale
        self.draw.ellipse(((x - radius) * s, (y - radius) * s, (x + radius) * s, (y + radius) * s), fill=fill,
                          outline=outline, width=max(1, round(width * s)))


def _draw_panel(c: _Canvas, box, title, series, legend=False, mark_best=False, log=False, fmt=None,
                headroom=0.05) -> None:
    """One plot: title, optional legend, y ticks and grid, integer epoch ticks, the curves."""
    x0, y0, x1, y1 = box
    fmt = fmt or _general
    series = [(label, colour, points) for label, colour, points in series if points]
    values = [v for _, _, points in series for _, v in points]
    top, bottom, right = y0 + 38, y1 - 50, x1 - 20

    if not values:
        left = x0 + 20
        c.text(left, y0 + 10, title)
        c.rect(left, top, right, bottom, outline=GRID_COLOUR)
        c.text((left + right) / 2, (top + bottom) / 2, "no data", fill=MUTED_COLOUR, ha="center", va="center")
        return

    if log:
        lo, hi, ticks = _log_axis(min(values), max(values))
        to_axis = math.log10
    else:
        lo, hi, ticks = _linear_axis(min(values), max(values), headroom)
        to_axis = float
    labels = _unique_labels(ticks, fmt)
    left = x0 + max(c.text_size(label)[0] for label in labels) + 16

    def y_of(v):
        return bottom - (to_axis(v) - lo) / (hi - lo) * (bottom - top)

    epochs = sorted({e for _, _, points in series for e, _ in points})
    e_lo, e_hi, e_ticks = _epoch_axis(epochs[0], epochs[-1], c, right - left)

    def x_of(e):
        return left + (e - e_lo) / (e_hi - e_lo) * (right - left)

    # Grid and ticks first, so the curves lie on top of them.
    for tick, label in zip(ticks, labels):
        y = y_of(tick)
        c.line([(left, y), (right, y)], GRID_COLOUR)
        c.line([(left - 4, y), (left, y)], AXIS_COLOUR)
        c.text(left - 7, y, label, ha="right", va="center")
    for e in e_ticks:
        x = x_of(e)
        c.line([(x, top), (x, bottom)], GRID_COLOUR)
        c.line([(x, bottom), (x, bottom + 4)], AXIS_COLOUR)
        c.text(x, bottom + 8, str(e), ha="center")
    c.rect(left, top, right, bottom, outline=AXIS_COLOUR)
    c.text((left + right) / 2, y1 - 8, "epoch", fill=MUTED_COLOUR, ha="center", va="bottom")
    c.text(left, y0 + 10, title)

    for _, colour, points in series:
        xy = [(x_of(e), y_of(v)) for e, v in points]
        if len(xy) > 1:
            c.line(xy, colour, width=2)
        if len(xy) <= 40:  # markers on every epoch would clutter a long run
            for x, y in xy:
                c.dot(x, y, 3, fill=colour)

    if legend:
        _draw_legend(c, right, y0 + 10, [(label, colour) for label, colour, _ in series])
    if mark_best:
        epoch, value = max(series[0][2], key=lambda p: p[1])  # the first of equal maxima, as training ranks them
        _draw_best(c, x_of(epoch), y_of(value), f"{_general(value)} @ epoch {epoch}", (left, top, right, bottom))


def _draw_legend(c: _Canvas, right, y, entries) -> None:
    """Right-aligned in the title row, so it never covers a curve."""
    _, h = c.text_size("Ag")
    x = right
    for label, colour in reversed(entries):
        w, _ = c.text_size(label)
        c.text(x, y, label, ha="right")
        c.rect(x - w - 26, y + h / 2 - 2, x - w - 6, y + h / 2 + 2, fill=colour)
        x -= w + 26 + 14


def _draw_best(c: _Canvas, x, y, label, plot) -> None:
    """A ringed dot on the best epoch and its value, above the dot when there is room, else below."""
    left, top, right, bottom = plot
    c.dot(x, y, 7, outline=BEST_COLOUR, width=2)
    c.dot(x, y, 3.5, fill=BEST_COLOUR)
    w, h = c.text_size(label)
    ty = y - 12 - h if y - 12 - h >= top + 3 else y + 12
    tx = min(max(x - w / 2, left + 4), right - 4 - w)
    c.rect(tx - 3, ty - 3, tx + w + 3, ty + h + 3, fill=BACKGROUND)  # keeps the text readable over grid lines
    c.text(tx, ty, label, fill=BEST_COLOUR)


def _nice_step(raw: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is at least ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * power * (1 + 1e-9):
            return m * power
    return 10 * power


def _linear_axis(vmin: float, vmax: float, headroom: float) -> tuple[float, float, list[float]]:
    """Axis bounds on round tick values around the data, with about six ticks; constant data gets a band."""
    non_negative = vmin >= 0
    if vmax == vmin:
        half = abs(vmin) * 0.1 or 1.0  # a flat line still needs a y range to sit in
        vmin, vmax = vmin - half, vmax + half
    span = vmax - vmin
    # Padding keeps points off the frame, but goes no lower than zero for data that never does.
    vmin, vmax = vmin - 0.05 * span, vmax + headroom * span
    if non_negative:
        vmin = max(vmin, 0.0)
    step = _nice_step((vmax - vmin) / 5)
    first, last = math.floor(vmin / step + 1e-9), math.ceil(vmax / step - 1e-9)
    ticks = [0.0 if i == 0 else i * step for i in range(first, last + 1)]  # 0.0, not -0.0, for the label
    return ticks[0], ticks[-1], ticks


def _log_axis(vmin: float, vmax: float) -> tuple[float, float, list[float]]:
    """Bounds in log10 units padded around the data; ticks at 1, 2 and 5 times powers of ten, or decades only."""
    a, b = math.log10(vmin), math.log10(vmax)
    pad = (b - a) * 0.06
    lo, hi = a - pad, b + pad
    candidates = [(m, k) for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)]
    ticks = [(m, k) for m, k in candidates if lo <= math.log10(m) + k <= hi]
    if len(ticks) > 7:
        ticks = [(m, k) for m, k in ticks if m == 1]
        ticks = ticks[:: math.ceil(len(ticks) / 6)]
    values = [m * 10.0 ** k for m, k in ticks]
    if len(values) < 2:  # less than one 1-2-5 step in range: label the ends instead
        values = [vmin, vmax]
    return lo, hi, values


def _epoch_axis(emin: int, emax: int, c: _Canvas, width: float) -> tuple[float, float, list[int]]:
    """Integer ticks, at most eight and spaced so their labels do not touch."""
    span = emax - emin
    pad = 1.0 if span == 0 else max(span * 0.04, 0.25)
    lo, hi = emin - pad, emax + pad
    label_w = max(c.text_size(str(emin))[0], c.text_size(str(emax))[0])
    power = 1
    while True:
        for m in (1, 2, 5):
            step = m * power
            count = span // step + 1
            if count <= 8 and width * step / (hi - lo) >= label_w * 1.6:
                start = -(-emin // step) * step  # first multiple of step at or after emin
                return lo, hi, list(range(start, emax + 1, step))
        power *= 10


def _general(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


def _sci(value: float, digits: int = 3) -> str:
    """Scientific notation without padding: 4e-4, 2.5e-4."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _unique_labels(ticks: list[float], fmt) -> list[str]:
    """Three significant digits, or more when three would print neighbouring ticks the same."""
    for digits in range(3, 9):
        labels = [fmt(t, digits) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels
