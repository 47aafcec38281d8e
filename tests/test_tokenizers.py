"""Tokenizers (word, char, smiles) and vocabularies built on them."""

import json

import pytest

from capcli.errors import CapcliError
from capcli.text.tokenizers import detokenize, tokenize
from capcli.text.vocab import END, START, UNK, Vocab


@pytest.mark.parametrize("smiles, tokens", [
    ("c1cc[nH]c1", ["c", "1", "c", "c", "[nH]", "c", "1"]),
    ("ClCCl", ["Cl", "C", "Cl"]),
    ("CCBr", ["C", "C", "Br"]),
    ("C1CC%10CC1%10", ["C", "1", "C", "C", "%10", "C", "C", "1", "%10"]),
    ("N[C@@H](C)C(=O)O", ["N", "[C@@H]", "(", "C", ")", "C", "(", "=", "O", ")", "O"]),
    ("[NH4+].[Cl-]", ["[NH4+]", ".", "[Cl-]"]),
    ("C/C=C\\C", ["C", "/", "C", "=", "C", "\\", "C"]),
    ("C#N", ["C", "#", "N"]),
    ("[O-][n+]1ccccc1", ["[O-]", "[n+]", "1", "c", "c", "c", "c", "c", "1"]),
])
def test_smiles_tokens(smiles, tokens):
    assert tokenize(smiles, "smiles") == tokens
    assert detokenize(tokens, "smiles") == smiles


def test_smiles_cl_is_not_c_then_l():
    assert tokenize("Cl", "smiles") == ["Cl"]
    # "C l" is not SMILES, but no character is lost: the space and the l are tokens of their own
    assert tokenize("C l", "smiles") == ["C", " ", "l"]
    assert tokenize("Cc", "smiles") == ["C", "c"]  # aliphatic then aromatic carbon, not one token
    assert tokenize("Sc", "smiles") == ["S", "c"]


@pytest.mark.parametrize("text", ["C[C@H](N)C(=O)O", "Zz ü 𝛼 ~?", "a  b\tc", "%1%99[13CH3]"])
def test_char_and_smiles_round_trip_any_text(text):
    for kind in ("char", "smiles"):
        assert detokenize(tokenize(text, kind), kind) == text


def test_char_keeps_case_spaces_and_punctuation():
    assert tokenize("Ab, c!", "char") == ["A", "b", ",", " ", "c", "!"]
    assert tokenize("Ab, c!", "word") == ["ab", "c"]


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        tokenize("x", "bpe")
    with pytest.raises(CapcliError, match="unknown tokenizer"):
        Vocab(["<pad>", "<start>", "<end>", "<unk>"], tokenizer="bpe")


def test_char_vocab_keeps_every_character_and_round_trips():
    train = ["CCO", "c1ccccc1Br", "Q"]  # Q seen once: kept, min count is 1 for characters
    vocab = Vocab.build(train, tokenizer="char")
    assert vocab.min_freq == 1 and vocab.max_len == 150
    for text in train:
        ids = vocab.encode(text)
        assert ids[0] == START and ids[-1] == END and UNK not in ids
        assert vocab.decode(ids[1:]) == text
    assert vocab.encode("CZ")[1:-1] == [vocab.index["C"], UNK]


def test_smiles_vocab_defaults_and_json_round_trip(tmp_path):
    vocab = Vocab.build(["CCl", "C[nH]C", "C%10CC%10"], tokenizer="smiles")
    assert vocab.max_len == 100 and "Cl" in vocab.index and "[nH]" in vocab.index and "%10" in vocab.index
    assert "l" not in vocab.index
    vocab.save(tmp_path / "v.json")
    again = Vocab.load(tmp_path / "v.json")
    assert again.tokenizer == "smiles" and again.words == vocab.words
    assert again.decode(again.encode("C%10CC%10")[1:]) == "C%10CC%10"


def test_old_vocab_files_are_word_vocabularies(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "dog"], "min_freq": 5, "max_len": 50}))
    vocab = Vocab.load(path)
    assert vocab.tokenizer == "word"
    assert vocab.encode("A Dog!") == [START, UNK, vocab.index["dog"], END]
    assert vocab.decode([vocab.index["dog"], vocab.index["dog"], END]) == "dog dog"


def test_train_refuses_a_vocabulary_of_another_tokenizer(tmp_path, shapes_dir):
    from typer.testing import CliRunner

    from capcli.cli import app

    Vocab.build(["a red square"], min_freq=1).save(tmp_path / "words.json")
    result = CliRunner().invoke(app, ["train", "--data", str(shapes_dir), "-o", str(tmp_path / "run"),
                                      "--vocab", str(tmp_path / "words.json"), "--tokenizer", "char"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"capcli: {tmp_path / 'words.json'}: a word vocabulary, but --tokenizer is char")
    assert not (tmp_path / "run" / "last.safetensors").exists()
