"""Exact match, edit similarity and the RDKit chemistry metrics, against values worked out by hand."""

import pytest

from capcli.metrics.chemistry import rdkit_available
from capcli.metrics.captions import score_predictions
from capcli.metrics.validation import validation_scores
from capcli.metrics.sequence import edit_similarity, levenshtein, sequence_scores


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("CCO", "OCC", 2), ("c1ccccc1", "c1ccccc1", 0),
    ("flaw", "lawn", 2),
])
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


def test_edit_similarity():
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "") == 0.0


def test_sequence_scores_take_the_best_reference():
    references = {"a": ["CCO", "OCC"], "b": ["CCN"], "c": ["kitten"]}
    candidates = {"a": "OCC", "b": "CC", "c": "sitting"}
    scores = sequence_scores(references, candidates)
    assert scores["exact match"] == pytest.approx(1 / 3)
    # a: 1 (equals its second reference); b: 1 - 1/3; c: 1 - 3/7
    assert scores["edit similarity"] == pytest.approx((1 + 2 / 3 + 4 / 7) / 3)


def test_word_models_keep_caption_metrics_and_sequence_models_do_not():
    references, candidates = {"x": ["a dog runs"]}, {"x": "a dog runs"}
    words, _ = score_predictions(references, candidates, "word", tokenizer="simple")
    assert "BLEU-4" in words and "exact match" not in words
    chars, _ = score_predictions(references, candidates, "char")
    assert chars == {"exact match": 1.0, "edit similarity": 1.0}
    assert validation_scores(references, {"x": "a dog"}, "char") == {
        "val_exact_match": 0.0, "val_edit_similarity": pytest.approx(1 - 5 / 10)}


def test_smiles_without_rdkit_says_how_to_get_the_chemistry_metrics(monkeypatch):
    import capcli.metrics.captions as evaluate

    monkeypatch.setattr(evaluate, "rdkit_available", lambda: False)
    scores, notes = score_predictions({"x": ["CCO"]}, {"x": "OCC"}, "smiles")
    assert set(scores) == {"exact match", "edit similarity"}
    assert notes == ["chemistry metrics skipped: they need RDKit (pip install 'capcli[chem]')"]


@pytest.mark.skipif(not rdkit_available(), reason="needs RDKit (pip install 'capcli[chem]')")
def test_chemistry_metrics_by_hand():
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    references = {"same": ["CCO"], "written_otherwise": ["c1ccccc1O"], "stereo": ["C[C@H](N)C(=O)O"],
                  "wrong": ["CCN"], "invalid": ["CCC"]}
    candidates = {"same": "CCO", "written_otherwise": "Oc1ccccc1", "stereo": "C[C@@H](N)C(=O)O",
                  "wrong": "CCO", "invalid": "C1CC("}
    scores, notes = score_predictions(references, candidates, "smiles")
    assert notes == []
    assert scores["exact match"] == pytest.approx(1 / 5)  # strings: only "same"
    assert scores["valid"] == pytest.approx(4 / 5)
    assert scores["canonical match"] == pytest.approx(2 / 5)  # same, written_otherwise
    assert scores["canonical match (no stereo)"] == pytest.approx(3 / 5)  # + stereo
    morgan = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fp = lambda s: morgan.GetFingerprint(Chem.MolFromSmiles(s))  # noqa: E731
    stereo = DataStructs.TanimotoSimilarity(fp("C[C@@H](N)C(=O)O"), fp("C[C@H](N)C(=O)O"))
    wrong = DataStructs.TanimotoSimilarity(fp("CCO"), fp("CCN"))
    assert 0 < wrong < 1
    assert scores["tanimoto"] == pytest.approx((1 + 1 + stereo + wrong + 0) / 5)


@pytest.mark.skipif(not rdkit_available(), reason="needs RDKit (pip install 'capcli[chem]')")
def test_valid_first_keeps_beam_order_within_valid_and_invalid():
    from capcli.metrics.chemistry import valid_first

    assert valid_first(["C1CC(", "CCO", "C((", "c1ccccc1"]) == [1, 3, 0, 2]
    assert valid_first(["CCO", "CCN"]) == [0, 1]
    assert valid_first([]) == []


@pytest.mark.skipif(not rdkit_available(), reason="needs RDKit (pip install 'capcli[chem]')")
def test_a_smiles_beam_answers_with_a_molecule(monkeypatch):
    """The Captioner ranks a SMILES beam's readable molecules first; word models are left alone."""
    import torch

    from capcli.infer.captioner import Captioner
    from capcli.infer.decode import DecodeOptions, Hypothesis
    from capcli.text.vocab import Vocab

    vocab = Vocab.build(["C1CC(", "CCO"], tokenizer="smiles")
    ids = lambda s: [vocab.index[t] for t in vocab.tokenize(s)]  # noqa: E731
    beam = [Hypothesis(ids("C1CC("), -1.0, -0.2, torch.zeros(5, 4), True),
            Hypothesis(ids("CCO"), -2.0, -0.5, torch.zeros(3, 4), True)]
    monkeypatch.setattr("capcli.infer.captioner.decode", lambda decoder, features, options: [beam[:options.nbest]])
    captioner = Captioner.__new__(Captioner)
    captioner.vocab, captioner.model = vocab, type("M", (), {"decoder": None})()
    best = captioner.decode(torch.zeros(1, 4, 8), DecodeOptions(beam_size=2))
    assert [vocab.decode(h.tokens) for h in best[0]] == ["CCO"]
    both = captioner.decode(torch.zeros(1, 4, 8), DecodeOptions(beam_size=2, nbest=2))
    assert [vocab.decode(h.tokens) for h in both[0]] == ["CCO", "C1CC("]
    vocab.tokenizer = "char"  # other models keep the beam's own order
    assert [vocab.decode(h.tokens) for h in captioner.decode(torch.zeros(1, 4, 8), DecodeOptions(beam_size=2))[0]] == ["C1CC("]
