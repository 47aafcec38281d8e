"""Metrics and `capcli evaluate`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from capcli.cli import app
from capcli.metrics import captions
from capcli.metrics.captions import score_captions

REFS = {
    "1": ["a black dog runs on the grass", "a dog running across a lawn", "the black dog is running"],
    "2": ["two children play in the sand", "kids playing on a beach", "two kids build a sandcastle"],
    "3": ["a man rides a red bike", "a cyclist on a red bicycle", "a man on a bike in the street"],
}


@pytest.mark.parametrize("tokenizer", ["simple", "auto"])
def test_perfect_captions_score_one_and_beat_wrong_ones(tokenizer, request):
    if tokenizer == "simple":  # as without Java; "auto" runs the Java tokenizer and METEOR where Java is
        request.getfixturevalue("no_java")
    perfect = {k: v[0] for k, v in REFS.items()}
    wrong = {"1": "two children play in the sand", "2": "a man rides a red bike", "3": "a black dog runs on the grass"}
    good, notes = score_captions(REFS, perfect, tokenizer=tokenizer)
    bad, _ = score_captions(REFS, wrong, tokenizer=tokenizer)
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert good["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert good["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert good["CIDEr"] > bad["CIDEr"] + 1.0
    assert bad["BLEU-4"] < 0.01
    if captions.java_available():
        assert good["METEOR"] > bad["METEOR"]
    else:
        assert "METEOR" not in good and any("METEOR" in n for n in notes)


def test_punctuation_and_case_do_not_matter():
    refs = {"a": ["A dog, running on the beach."]}
    scores, _ = score_captions(refs, {"a": "a dog running on the beach"}, metrics=("BLEU",), tokenizer="simple")
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_empty_caption_scores_zero_without_hanging():
    scores, _ = score_captions(REFS, {"1": "", "2": "kids playing on a beach", "3": "a man"}, tokenizer="simple")
    assert 0 < scores["BLEU-1"] < 1


def test_evaluate_command_json_and_saved_captions(trained_model, shapes_dir, tmp_path, no_java):
    saved = tmp_path / "captions.jsonl"
    result = CliRunner().invoke(app, ["evaluate", "--data", str(shapes_dir), "-m", str(trained_model), "--split", "val",
                                      "--json", "--save", str(saved), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["split"] == "val" and scores["images"] > 0 and scores["beam_size"] == 1
    assert (scores["runtime"], scores["precision"]) == ("torch", "fp32")  # in this process auto keeps PyTorch
    assert {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(scores)
    assert scores["BLEU-1"] > 0.5  # the model learnt the shapes
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == scores["images"]
    assert all(r["caption"] and len(r["references"]) == 5 for r in rows)

    table = CliRunner().invoke(app, ["evaluate", "--data", str(shapes_dir), "-m", str(trained_model), "--split", "val",
                                     "-k", "3", "--device", "cpu"])
    assert table.exit_code == 0 and "BLEU-4" in table.stdout and "CIDEr" in table.stdout


def test_saved_captions_keep_a_data_folder_name_that_is_not_utf8(trained_model, shapes_dir, tmp_path, no_java):
    import os
    import shutil

    folder = tmp_path / os.fsdecode(b"shapes-\xff")  # a name Linux allows, not UTF-8
    shutil.copytree(shapes_dir, folder)
    saved = tmp_path / "captions.jsonl"
    result = CliRunner().invoke(app, ["evaluate", "--data", str(folder), "-m", str(trained_model), "--split", "val",
                                      "--save", str(saved), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in saved.read_bytes().decode().splitlines()]  # UTF-8, \udcff escaped
    assert rows and all(os.fsencode(r["path"]).startswith(os.fsencode(folder) + b"/") for r in rows)
    assert all(os.path.isfile(r["path"]) for r in rows)  # each path names its image again


def test_evaluate_uses_the_split_the_model_was_trained_with(trained_model, shapes_dir):
    # trained with --split 80/20/0: its test split is empty, and evaluate says so
    result = CliRunner().invoke(app, ["evaluate", "--data", str(shapes_dir), "-m", str(trained_model), "--device", "cpu"])
    assert result.exit_code == 2
    assert "test split is empty (split from hash 80/20/0 of image names)" in result.stderr
