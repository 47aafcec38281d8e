"""Training curves: panels drawn from metrics.jsonl records, replayed epochs, gaps in the data, PNG writing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from capcli.train import curves
from capcli.train.curves import _by_epoch, render_curves, save_curves


def run(n: int = 5, **extra) -> list[dict]:
    return [
        {"epoch": e, "train_loss": 4.0 / e, "val_loss": 4.2 / e + 0.1, "val_bleu4": 0.02 * e - 0.001 * e * e,
         "lr": 4e-4 * 0.5 ** (e // 3), "best": True, **extra}
        for e in range(1, n + 1)
    ]


def colours(image: Image.Image) -> set[tuple[int, int, int]]:
    return {c for _, c in image.getcolors(maxcolors=image.width * image.height)}


def test_render_five_epochs_draws_every_panel():
    image = render_curves(run(5))
    assert image.mode == "RGB"
    assert image.size == (curves.WIDTH, curves.HEIGHT)
    present = colours(image)
    assert len(present) > 20  # text, grid and anti-aliased curves, not a blank canvas
    for colour in (curves.TRAIN_COLOUR, curves.VAL_COLOUR, curves.METRIC_COLOUR, curves.BEST_COLOUR,
                   curves.LR_COLOUR):
        assert colour in present


def test_each_curve_lands_in_its_own_panel():
    image = render_curves(run(5))
    third = curves.WIDTH // 3

    def panel(i):
        return colours(image.crop((i * third, 0, (i + 1) * third, curves.HEIGHT)))

    assert {curves.TRAIN_COLOUR, curves.VAL_COLOUR} <= panel(0)
    assert curves.METRIC_COLOUR in panel(1) and curves.TRAIN_COLOUR not in panel(1)
    assert curves.LR_COLOUR in panel(2) and curves.METRIC_COLOUR not in panel(2)


def test_replayed_epoch_keeps_its_last_record():
    records = [
        {"epoch": 1, "train_loss": 3.0},
        {"epoch": 2, "train_loss": 2.5},
        {"epoch": 3, "train_loss": 2.2},  # crashed after writing epoch 3 ...
        {"epoch": 3, "train_loss": 2.1},  # ... resumed from epoch 2's checkpoint and replayed it
        {"epoch": 4, "train_loss": 1.9},
        {"epoch": 2, "train_loss": 2.4},  # an older replay, out of order
    ]
    rows = _by_epoch(records)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in rows] == [3.0, 2.4, 2.1, 1.9]


def test_records_without_a_usable_epoch_are_dropped():
    rows = _by_epoch([{"train_loss": 1.0}, {"epoch": None}, {"epoch": True}, {"epoch": 2.0, "lr": 1e-3}, "junk"])
    assert rows == [{"epoch": 2.0, "lr": 1e-3}]


def test_series_skips_missing_none_nan_and_flags():
    rows = _by_epoch([{"epoch": 1, "x": 1.5}, {"epoch": 2, "x": None}, {"epoch": 3}, {"epoch": 4, "x": math.nan},
                      {"epoch": 5, "x": True}, {"epoch": 6, "x": 2}])
    assert curves._series(rows, "x") == [(1, 1.5), (6, 2.0)]


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([], id="empty"),
        pytest.param(run(1), id="single-epoch"),
        pytest.param([{k: v for k, v in r.items() if not k.startswith("val_")} for r in run(6)], id="no-val"),
        pytest.param([{**r, "val_loss": None, "val_bleu4": None} for r in run(4)], id="val-none"),
        pytest.param([{"epoch": e} for e in range(1, 4)], id="only-epochs"),
        pytest.param(run(4, lr=1e-3), id="constant-lr"),
        pytest.param([{"epoch": e, "train_loss": 2.0, "val_loss": 2.0, "val_bleu4": 0.0, "lr": 0.0}
                      for e in range(1, 4)], id="constant-zero"),
        pytest.param([{**r, "val_loss": math.inf if r["epoch"] == 2 else r["val_loss"]} for r in run(4)],
                     id="inf-value"),
        pytest.param(run(250), id="long-run"),
    ],
)
def test_gaps_and_degenerate_data_render(records):
    image = render_curves(records)
    assert image.size == (curves.WIDTH, curves.HEIGHT)
    assert len(colours(image)) > 2  # at least titles and frames


def test_panel_without_data_leaves_its_colour_out():
    no_val = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in run(5)]
    present = colours(render_curves(no_val))
    assert curves.TRAIN_COLOUR in present and curves.LR_COLOUR in present
    assert curves.VAL_COLOUR not in present and curves.METRIC_COLOUR not in present


def test_selection_metric_is_read_from_its_key():
    records = [{"epoch": e, "val_cider": 0.1 * e} for e in range(1, 4)]
    assert curves.METRIC_COLOUR in colours(render_curves(records, selection_metric="val_cider"))
    assert curves.METRIC_COLOUR not in colours(render_curves(records))


def test_number_formatting():
    assert curves._general(0.123456) == "0.123"
    assert curves._general(2.0) == "2"
    assert curves._sci(4e-4) == "4e-4"
    assert curves._sci(2.5e-4) == "2.5e-4"
    assert curves._sci(1.234e-5) == "1.23e-5"
    # Neighbouring ticks that print alike at 3 digits get more.
    assert curves._unique_labels([2.4001, 2.4002], curves._general) == ["2.4001", "2.4002"]


def test_axes_include_the_data():
    lo, hi, ticks = curves._linear_axis(0.013, 0.118, 0.05)
    assert lo <= 0.013 and hi >= 0.118 and 3 <= len(ticks) <= 8
    lo, hi, ticks = curves._linear_axis(5.0, 5.0, 0.05)  # constant: a band around it, no zero-width range
    assert lo < 5.0 < hi
    lo, hi, ticks = curves._log_axis(1e-5, 1e-3)
    assert lo <= -5 and hi >= -3 and 1e-5 in ticks and 1e-3 in ticks


def test_save_writes_png(tmp_path):
    path = tmp_path / "curves.png"
    save_curves(path, run(5))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (curves.WIDTH, curves.HEIGHT)


def test_save_goes_through_the_writer(tmp_path):
    path = tmp_path / "run" / "curves.png"
    calls = []

    def write(target, fn):  # atomic_write's contract: fn fills a temporary file, which is renamed over target
        calls.append(target)
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(".curves.png.tmp")
        fn(tmp)
        tmp.replace(target)

    save_curves(path, run(3), write=write)
    assert calls == [path]
    assert sorted(p.name for p in path.parent.iterdir()) == ["curves.png"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (curves.WIDTH, curves.HEIGHT)


def test_old_pillow_falls_back_to_the_bitmap_font(monkeypatch):
    load_default = curves.ImageFont.load_default

    def old_load_default(*args, **kwargs):  # Pillow < 10.1 takes no size
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return load_default()

    monkeypatch.setattr(curves.ImageFont, "load_default", old_load_default)
    font, scale = curves._load_font()
    assert scale == 1
    image = render_curves(run(5))
    assert image.size == (curves.WIDTH, curves.HEIGHT)
    assert {curves.TRAIN_COLOUR, curves.VAL_COLOUR, curves.LR_COLOUR} <= colours(image)
