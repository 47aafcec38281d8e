"""The front door: every command's --help at 80 columns, --version, the progress bar's columns,
and the runs that used to do less than asked without a word (--nbest in text, empty shares,
a model evaluated on data it does not fit)."""

from __future__ import annotations

import csv
import io
import re
import shutil

import pytest
from typer.testing import CliRunner

from capcli import choices
from capcli.cli import app
from capcli.version import __version__

COMMANDS = ["build-vocab", "train", "caption", "beam", "evaluate", "quantize", "export"]


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def panels(text: str) -> list[str]:
    return re.findall(r"^╭─ (.+?) ─", text, flags=re.M)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_fits_80_columns_and_splits_no_choice(command):
    text = help_text(*filter(None, [command]))
    assert max(len(line) for line in text.splitlines()) <= 80
    # Every word of a choice list is a whole choice: `<additive|general|dot|no` / `ne>` was cut mid-word
    whole = {*choices.ATTENTIONS, *choices.RNNS, *choices.DEVICES, *choices.CAPTION_PRECISIONS, *choices.FORMATS,
             *choices.RUNTIMES, *choices.EXPORT_FORMATS,
             "word", "char", "smiles", "mean", "greedy", "train", "val", "test", "int", "float", "path", "str", "list",
             "range", "x"}  # <int range> [x>=1]
    for line in text.splitlines():
        words = re.findall(r"[<|] ?([a-z0-9]+)", line) + re.findall(r"([a-z0-9]+) ?[|>]", line)
        assert set(words) <= whole, line


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_lists_the_global_flags_last_with_help(command):
    text = help_text(command)
    names = panels(text)
    assert names[-1] == "General" and "Options" not in names  # no panel holding only --help, above the rest
    assert len(names) == len(set(names))  # caption/beam showed two panels named Input
    general = text[text.index("╭─ General"):]
    assert "--quiet" in general and "-q" in general and "--debug" in general and "--help" in general


def test_descriptions_wrap_as_paragraphs():
    text = help_text("train")
    # The docstring's hard line break after "for the" made a ragged line of its own
    assert "self-critical training (CIDEr-D reward) for the rest" in " ".join(text.split())
    assert not any(line.strip() in ("rest; usually from a trained model: --init runs/xe/best.safetensors",
                                    "(CIDEr-D reward) for the") for line in text.splitlines())
    beam = help_text("beam")
    assert " $ capcli beam -k 5 photo.jpg" in [line.rstrip() for line in beam.splitlines()]  # examples keep a line each


def test_smiles_atoms_and_capcli_model_show_in_help():
    assert "[nH]" in help_text("build-vocab")  # rich markup swallowed it
    assert "$CAPCLI_MODEL" in " ".join(help_text("caption").split())


def test_split_means_one_thing_per_name():
    for command in ("train", "build-vocab"):
        text = help_text(command)
        assert "--split-ratios" in text and not re.search(r"--split\b(?!-)", text)
    text = help_text("evaluate")
    assert re.search(r"--split +<train \| val \| test>", text) and "--split-ratios" in text


def test_old_split_spelling_still_means_ratios(shapes_dir, tmp_path):
    out = tmp_path / "v.json"
    result = CliRunner().invoke(app, ["build-vocab", "--data", str(shapes_dir), "--split=100/0/0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, ["build-vocab", "--data", str(shapes_dir), "--split", "9/9", "-o", str(out)])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "capcli: --split-ratios '9/9': expected three numbers train/val/test such as 90/5/5"


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"capcli {__version__}\n"


def test_progress_bar_keeps_its_times_at_80_columns():
    from rich.console import Console

    from capcli.cli import RichReporter

    drawn = io.StringIO()
    reporter = RichReporter(Console(file=drawn, width=80))
    reporter.start("epoch 12/20", 1234, unit="batches")
    reporter.update(567, loss=3.2145, ppl=24.88, captions_per_s=1234.5)
    reporter.stop()
    line = drawn.getvalue().splitlines()[-1]
    assert len(line) <= 80
    assert re.search(r"567/1234 batches \d:\d\d:\d\d eta -:--:-- loss 3.21", line), line  # were cut to "0:…"


def test_nbest_without_jsonl_warns_once(trained_model, shapes_dir):
    image = str(next((shapes_dir / "Images").glob("*.png")))
    result = CliRunner().invoke(app, ["beam", "-m", str(trained_model), "-k", "3", "--nbest", "3", "-f", "tsv", image])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr.splitlines() == [
        "capcli: warning: --nbest 3: tsv output has one caption per image; only jsonl (-f jsonl) has the alternatives"]
    quiet = CliRunner().invoke(app, ["beam", "-m", str(trained_model), "-k", "3", "--nbest", "3", "-f", "jsonl", image])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_an_empty_share_says_so(trained_model, shapes_dir, tmp_path):
    images = tmp_path / "few"
    images.mkdir()
    for path in sorted((shapes_dir / "Images").glob("*.png"))[:3]:
        shutil.copy(path, images / path.name)
    result = CliRunner().invoke(app, ["-q", "caption", "-m", str(trained_model), str(images), "--shard", "1/2"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "capcli: warning: --shard 1/2: this share is empty: the 3 images make 1 batches of --batch-size 32"]
    first = CliRunner().invoke(app, ["-q", "caption", "-m", str(trained_model), str(images), "--shard", "0/2"])
    assert first.exit_code == 0 and len(first.stdout.splitlines()) == 3 and first.stderr == ""


def test_evaluate_warns_when_the_model_does_not_fit_the_data(trained_model, shapes_dir, tmp_path, no_java):
    # The shapes model (words) on SMILES references: none of their tokens are words it knows
    table = tmp_path / "molecules.csv"
    with open(table, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["image", "caption"])
        for path in sorted((shapes_dir / "Images").glob("*.png")):
            rows.writerow([path.name, "CC(=O)Oc1ccccc1C(=O)O"])
    result = CliRunner().invoke(app, ["evaluate", "-m", str(trained_model), "--captions", str(table), "--images",
                                      str(shapes_dir / "Images"), "--split", "val", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert (f"capcli: warning: {trained_model}: its word vocabulary knows 0% of the reference tokens: the model "
            "does not fit this data (a SMILES model on photo captions, or the reverse?)") in result.stderr.splitlines()
    fitting = CliRunner().invoke(app, ["evaluate", "-m", str(trained_model), "--data", str(shapes_dir),
                                       "--split", "val", "--limit", "2", "--json"])
    assert fitting.exit_code == 0 and "does not fit" not in fitting.stderr
