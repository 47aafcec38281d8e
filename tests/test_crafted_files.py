"""Crafted files (issue 19, items 5, 10, 11, 12): a model file, a JSON file or a run folder that lies
never makes capcli allocate what the lie asks for, crash, or print more than one line.

 Model files (model_files.load_model; `caption --model`, `train --init`: exit 2, one line naming the file)
  config size out of choices.MODEL_LIMITS  E "model config: decoder_dim 16000 must be a whole number from 1 to 8192"
   (image_size 32..1024, grid 0..64, dims 1..8192, vocab_size 4..1000000, dropout 0 <= p < 1)
  a config value of the wrong type         E "model config: embed_dim must be a whole number, not '128'" (bool,
   (string, bool, float, NaN, short mean)     float, NaN and 3-number lists likewise); nothing built for real
  config within bounds, no such tensors    E "weights do not match the model config (...)": built on the meta
                                             device only, no tensor read
  a tensor of the wrong kind or size       E "weight NAME is stored as I64, the model needs a float type" /
                                             "corrupt model file (... data offsets do not fit its shape)"
  nested too deeply / a huge number        E "damaged capcli metadata (config: invalid JSON (nested too deeply))" /
   in a metadata string                       "(... (a number too large))"; in the header itself:
                                              "not a capcli model (not a safetensors file, or truncated)"
  damaged training record (deep, a split  loads; its training record reads as {}
   that is not text)
  a vocabulary token with a control        E "vocabulary: vocabulary token N ('a\\nb') holds a control character
   character (Cc, U+2028/9, a surrogate)      (U+000A)"; a space token (char models) and U+00A0 load
 Vocabulary files (--vocab, vocab.json): the same control-character rule; Vocab.build leaves such tokens out
 JSON caption files: nested too deeply, a huge number -> E "FILE:LINE: invalid JSON (...)" (JSONL) or
  "FILE: invalid JSON (...)" (Karpathy, COCO); a JSONL field that is not text -> E "FILE:LINE: ... must be text"
 Run folders (`train --resume`): config.json not an object, of wrong types, out of bounds, not the
  config of last.safetensors; vocab.json not its vocabulary -> E naming config.json / vocab.json, exit 2
 Feature cache records (features-*.json) damaged -> one warning naming the record; its rows are encoded again
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import warnings_of
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.datasets import load_dataset
from capcli.data.tables import read_caption_table
from capcli.errors import CapcliError
from capcli.files import FileProblem, parse_json, read_json
from capcli.model import files as model_files
from capcli.model.caption_model import CaptionModel
from capcli.model.config import ModelConfig
from capcli.text.vocab import Vocab
from capcli.train.config import TrainConfig
from capcli.train.feature_cache import FeatureCache

pytestmark = pytest.mark.usefixtures("capcli_log")  # caplog sees capcli's warnings

DEEP = "[" * 100_000 + "]" * 100_000


# --------------------------------------------------------------------------- helpers

def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_model(path: Path, header: dict | str, body: bytes = b"") -> Path:
    data = (header if isinstance(header, str) else json.dumps(header)).encode()
    data += b" " * (-len(data) % 8)
    path.write_bytes(struct.pack("<Q", len(data)) + data + body)
    return path


def crafted(src: Path, dst: Path, *, config: dict | None = None, vocab: dict | None = None, body: bool = True,
            raw: dict[str, str] | None = None) -> Path:
    """A copy of model ``src`` with its config or vocabulary changed (merged into the file's), or
    metadata strings replaced by ``raw``; ``body=False`` drops every tensor (a 9 KB file)."""
    header, data = read_header(src)
    meta = header["__metadata__"]
    if config is not None:
        meta["config"] = json.dumps({**json.loads(meta["config"]), **config})
    if vocab is not None:
        meta["vocab"] = json.dumps({**json.loads(meta["vocab"]), **vocab})
    meta.update(raw or {})
    if not body:
        header = {"__metadata__": meta}
    return write_model(dst, header, data if body else b"")


def one_line(excinfo, path: Path) -> str:
    """The message of a CapcliError after 'PATH: ', checked to be one line with exit code 2."""
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert excinfo.value.exit_code == 2
    return message[len(f"{path}: "):]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A small untrained Lite0 model file (64 px, 2x2 grid, tiny decoder)."""
    torch.manual_seed(0)
    vocab = Vocab.build(["a red square", "a blue circle", "the square is red"], min_freq=1)
    cfg = ModelConfig(vocab_size=len(vocab), image_size=64, grid=2, embed_dim=8, attention_dim=8, decoder_dim=12)
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    model_files.save_model(path, CaptionModel(cfg), vocab, encoder_weights="test")
    return path


@pytest.fixture
def real_builds(monkeypatch) -> list:
    """Configs of the models built with real memory (not on the meta device), and of tensors read."""
    import safetensors.torch

    built = []
    init, load_file = CaptionModel.__init__, safetensors.torch.load_file

    def spy_init(self, cfg):
        init(self, cfg)
        if not next(self.parameters()).is_meta:
            built.append(("built", cfg.to_dict()))

    def spy_load_file(*args, **kwargs):
        built.append(("read tensors", args))
        return load_file(*args, **kwargs)

    monkeypatch.setattr(CaptionModel, "__init__", spy_init)
    monkeypatch.setattr(safetensors.torch, "load_file", spy_load_file)
    return built


# =========================================================================== model configs (item 10)

BAD_CONFIGS = [
    ({"decoder_dim": 16000}, "model config: decoder_dim 16000 must be a whole number from 1 to 8192"),
    ({"image_size": 3000}, "model config: image_size 3000 must be a whole number from 32 to 1024"),
    ({"grid": 3000}, "model config: grid 3000 must be a whole number from 0 to 64"),
    ({"grid": -1}, "model config: grid -1 must be a whole number from 0 to 64"),
    ({"embed_dim": 0}, "model config: embed_dim 0 must be a whole number from 1 to 8192"),
    ({"vocab_size": 7_000_004}, "model config: vocab_size 7000004 must be a whole number from 4 to 1000000"),
    ({"embed_dim": "128"}, "model config: embed_dim must be a whole number, not '128'"),
    ({"image_size": True}, "model config: image_size must be a whole number, not True"),
    ({"image_size": 64.0}, "model config: image_size 64.0 must be a whole number from 32 to 1024"),
    ({"attention_dim": None}, "model config: attention_dim must be a whole number, not None"),
    ({"dropout": 1.0}, "model config: dropout 1.0 must be at least 0 and below 1"),
    ({"dropout": "0.1"}, "model config: dropout must be a number, not '0.1'"),
    ({"mean": [0.5, 0.5]}, "model config: mean must be a list of 3 numbers, not [0.5, 0.5]"),
    ({"std": "0.5"}, "model config: std must be a list of 3 numbers, not '0.5'"),
    ({"encoder": 5}, "model config: encoder must be a name, not 5"),
    ({"rnn": ["lstm"]}, "model config: rnn must be a name, not ['lstm']"),
    ({"feature_dim": -3}, "model config: feature_dim must be a whole number, not -3"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS, ids=[json.dumps(c) for c, _ in BAD_CONFIGS])
def test_config_out_of_bounds_or_of_the_wrong_type_is_refused_before_anything_is_built(
        small_model, tmp_path, real_builds, change, message):
    path = crafted(small_model, tmp_path / "m.safetensors", config=change)
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == message
    assert real_builds == []


def test_nan_dropout_in_a_config_is_refused(small_model, tmp_path):
    header, body = read_header(small_model)
    config = json.loads(header["__metadata__"]["config"])
    header["__metadata__"]["config"] = json.dumps({**config, "dropout": math.nan})  # written as NaN
    path = write_model(tmp_path / "m.safetensors", header, body)
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == "model config: dropout nan must be at least 0 and below 1"


def test_a_9kb_file_whose_config_asks_for_a_big_model_is_refused_on_the_meta_device(small_model, tmp_path, real_builds):
    # Within the bounds, but the file holds no tensors: the old code built the 4096-wide decoder
    # (a GB at 8192) before it saw that nothing was there.
    path = crafted(small_model, tmp_path / "lie.safetensors", config={"decoder_dim": 4096, "embed_dim": 4096}, body=False)
    assert path.stat().st_size < 10_000
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path).startswith("weights do not match the model config (missing encoder.")
    assert real_builds == []


def test_every_shape_and_dtype_kind_is_compared_with_the_header_before_tensors_are_read(small_model, tmp_path, real_builds):
    header, body = read_header(small_model)
    # The config's vocabulary size (and the vocabulary) grown; the tensors left as they are.
    vocab = json.loads(header["__metadata__"]["vocab"])
    n = len(vocab["words"])
    bigger = {"words": vocab["words"] + [f"w{i}" for i in range(50)]}
    path = crafted(small_model, tmp_path / "v.safetensors", config={"vocab_size": n + 50}, vocab=bigger)
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == f"weight decoder.embedding.weight has shape ({n}, 8), the config implies ({n + 50}, 8)"
    # A float weight stored as an integer type of the same size.
    name = "decoder.fc.bias"
    as_int = json.loads(json.dumps(header))
    as_int[name]["dtype"] = "I32"
    path = write_model(tmp_path / "int.safetensors", as_int, body)
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == f"weight {name} is stored as I32, the model needs a float type"
    # A header entry whose shape is not what its data offsets hold.
    grown = json.loads(json.dumps(header))
    grown[name]["shape"] = [10**12]
    path = write_model(tmp_path / "shape.safetensors", grown, body)
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == f"corrupt model file (the header entry of '{name}': its data offsets do not fit its shape)"
    # A dtype that is not a name (a list: unhashable).
    listed = json.loads(json.dumps(header))
    listed[name]["dtype"] = ["F32"]
    path = write_model(tmp_path / "dtype.safetensors", listed, body)
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == f"corrupt model file (the header entry of '{name}' has no valid dtype and shape)"
    assert real_builds == []


def test_a_vocabulary_longer_than_the_weights_is_refused_before_it_is_built(small_model, tmp_path, real_builds, monkeypatch):
    header, _ = read_header(small_model)
    words = json.loads(header["__metadata__"]["vocab"])["words"]
    path = crafted(small_model, tmp_path / "m.safetensors", vocab={"words": words + [f"w{i}" for i in range(100_000)]})
    built = []
    monkeypatch.setattr(Vocab, "__post_init__", lambda self: built.append(len(self.words)))
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == f"vocabulary has {len(words) + 100_000} words but the model expects {len(words)}"
    assert built == [] and real_builds == []


def test_a_fitting_model_still_loads_once(small_model, real_builds):
    loaded = model_files.load_model(small_model)
    assert loaded.model.cfg.decoder_dim == 12 and len(loaded.vocab) == loaded.model.cfg.vocab_size
    assert [kind for kind, _ in real_builds] == ["read tensors", "built"]


def test_shipped_models_fit_the_bounds():
    weights = Path(__file__).resolve().parent.parent / "weights"
    for path in sorted(weights.glob("*.safetensors")):
        cfg, vocab, _ = model_files.inspect_model(path)
        assert len(vocab) == cfg.vocab_size, path


def test_crafted_configs_through_the_cli(small_model, tmp_path, shapes_dir):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    big = crafted(small_model, tmp_path / "big.safetensors", config={"image_size": 3000})
    result = CliRunner().invoke(app, ["caption", "--model", str(big), "--device", "cpu", str(image)])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"capcli: {big}: model config: image_size 3000 must be a whole number from 32 to 1024\n"
    # --init loads through the same checks, before any run folder is made
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(shapes_dir), "--init", str(big), "-o", str(run), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.stderr == f"capcli: {big}: model config: image_size 3000 must be a whole number from 32 to 1024\n"
    assert not run.exists()


@pytest.mark.parametrize("option,value,message", [
    ("--image-size", "3000", "--image-size 3000 must be a whole number from 32 to 1024"),
    ("--grid", "100", "--grid 100 must be a whole number from 0 to 64"),
    ("--decoder-dim", "16000", "--decoder-dim 16000 must be a whole number from 1 to 8192"),
])
def test_train_refuses_a_model_it_could_not_load_before_reading_data(shapes_dir, tmp_path, option, value, message):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(shapes_dir), "-o", str(run), "--device", "cpu", option, value])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"capcli: {message}\n"
    assert not run.exists()


# =========================================================================== JSON (item 11)

@pytest.mark.parametrize("text,reason", [
    (DEEP, "nested too deeply"),
    ('{"a": ' + "9" * 5000 + "}", "a number too large"),
    ('{"a": 1e999999}', "a number too large"),
    ('{"a": -1e400}', "a number too large"),
    ("{nope", "Expecting property name enclosed in double quotes"),
    ('{"a": 1,\n\n "b": }', "Expecting value at line 3"),
])
def test_parse_json_gives_one_line_naming_where(text, reason):
    with pytest.raises(FileProblem) as e:
        parse_json(text, "f.json:7")
    assert str(e.value) == f"f.json:7: invalid JSON ({reason})"


def test_parse_json_keeps_what_json_writes():
    assert parse_json('{"a": [1, 2.5, "x", null, true], "n": NaN, "big": 1e308}', "w") == {
        "a": [1, 2.5, "x", None, True], "n": pytest.approx(math.nan, nan_ok=True), "big": 1e308}


def test_read_json_of_a_deep_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    with pytest.raises(FileProblem) as e:
        read_json(path)
    assert str(e.value) == f"{path}: invalid JSON (nested too deeply)"


@pytest.mark.parametrize("key,text,reason", [
    ("config", DEEP, "config: invalid JSON (nested too deeply)"),
    ("vocab", DEEP, "vocab: invalid JSON (nested too deeply)"),
    ("config", '{"vocab_size": 1' + "0" * 5000 + "}", "config: invalid JSON (a number too large)"),
    ("config", '{"vocab_size": 12, "dropout": 1e999999}', "config: invalid JSON (a number too large)"),
])
def test_deep_or_huge_metadata_json(small_model, tmp_path, key, text, reason):
    path = crafted(small_model, tmp_path / "m.safetensors", raw={key: text})
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == f"damaged capcli metadata ({reason})"


def test_deep_json_in_the_safetensors_header(small_model, tmp_path):
    header, _ = read_header(small_model)
    meta = json.dumps(header["__metadata__"])
    path = write_model(tmp_path / "m.safetensors", '{"__metadata__": ' + meta + ', "x": ' + DEEP + "}")
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    assert one_line(e, path) == "not a capcli model (not a safetensors file, or truncated)"
    with pytest.raises(CapcliError):
        model_files.read_metadata(path)


@pytest.mark.parametrize("record", [DEEP, '{"epochs": 1e999999}', '{"split": 5}', '{"split_source": ["a"]}',
                                    '{"checkpoint_id": {"x": 1}}'])
def test_a_damaged_training_record_does_not_stop_the_model(small_model, tmp_path, record):
    # `evaluate` reads its split, `--resume` its checkpoint id: a damaged record reads as {}
    path = crafted(small_model, tmp_path / "m.safetensors", raw={"training": record})
    assert model_files.load_model(path).training == {}
    assert model_files.training_record({"training": '{"split": null, "epochs": 3}'}) == {"split": None, "epochs": 3}


def test_deep_or_huge_jsonl_caption_lines(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    good = '{"image": "a.jpg", "caption": "a dog"}\n'
    for bad, reason in [(f'{{"image": "a.jpg", "caption": {DEEP}}}', "invalid JSON (nested too deeply)"),
                        ('{"image": "a.jpg", "caption": 1e999999}', "invalid JSON (a number too large)"),
                        ('{"image": ' + "1" * 5000 + ', "caption": "x"}', "invalid JSON (a number too large)"),
                        ('{"image": "a.jpg", "caption": [["nested"]]}', "the image, caption and split fields must be text"),
                        ('{"image": {"a": 1}, "caption": "x"}', "the image, caption and split fields must be text")]:
        path = tmp_path / "c.jsonl"
        path.write_text(good + bad + "\n")
        with pytest.raises(CapcliError) as e:
            read_caption_table(path)
        assert one_line(e, Path(f"{path}:2")) == reason


def test_a_jsonl_key_with_a_newline_stays_on_one_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"im\\nage": "a.jpg", "label": "x"}\n')
    with pytest.raises(CapcliError) as e:
        read_caption_table(path)
    assert one_line(e, Path(f"{path}:1")).startswith("no image and caption fields (found: 'im\\nage', label)")


def test_deep_karpathy_and_coco_files(tmp_path):
    karpathy = tmp_path / "k"
    karpathy.mkdir()
    (karpathy / "dataset_flickr8k.json").write_text('{"images": [{"filename": "a.jpg", "sentences": ' + DEEP + "}]}")
    with pytest.raises(CapcliError) as e:
        load_dataset(karpathy)
    assert one_line(e, karpathy / "dataset_flickr8k.json") == "invalid JSON (nested too deeply)"
    coco = tmp_path / "c"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "captions_train2014.json").write_text('{"images": [], "annotations": [{"image_id": 1e999999}]}')
    with pytest.raises(CapcliError) as e:
        load_dataset(coco)
    assert one_line(e, coco / "annotations" / "captions_train2014.json") == "invalid JSON (a number too large)"


def test_a_deep_result_line_is_not_a_result_line():
    from capcli.infer.result_lines import line_path

    with pytest.raises(CapcliError) as e:
        line_path('{"path": ' + DEEP + "}", "jsonl", "out.jsonl:3")
    assert str(e.value) == "out.jsonl:3: not a capcli jsonl result line"


# =========================================================================== control characters (item 5)

@pytest.mark.parametrize("token", ["with\tx", "a\nb.jpg\tforged", "x\r", "nul\x00", "sep\u2028", "nel\x85", "esc\x1b[2J",
                                   "del\x7f", "para\u2029", "\ud800"])
def test_a_vocabulary_token_with_a_control_character_is_refused(small_model, tmp_path, token):
    header, _ = read_header(small_model)
    words = json.loads(header["__metadata__"]["vocab"])["words"]
    words[5] = token
    path = crafted(small_model, tmp_path / "m.safetensors", vocab={"words": words})
    with pytest.raises(CapcliError) as e:
        model_files.load_model(path)
    char = next(c for c in token if not c.isprintable())
    assert one_line(e, path) == f"vocabulary: vocabulary token 5 ({token!r}) holds a control character (U+{ord(char):04X})"
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps({"words": words}))  # ensure_ascii: the lone surrogate as \ud800
    with pytest.raises(CapcliError) as e:
        Vocab.load(vocab_file)
    assert one_line(e, vocab_file).startswith("vocabulary token 5 (")


def test_spaces_and_other_printable_tokens_are_fine(small_model, tmp_path):
    header, _ = read_header(small_model)
    words = json.loads(header["__metadata__"]["vocab"])["words"]
    words[4:8] = [" ", "\u00a0", "\u200d", "é"]  # a char model's space, a no-break space, a joiner (emoji), a letter
    path = crafted(small_model, tmp_path / "m.safetensors", vocab={"words": words, "tokenizer": "char"})
    assert model_files.load_model(path).vocab.words[4:8] == [" ", "\u00a0", "\u200d", "é"]


def test_build_leaves_control_characters_out_of_a_char_vocabulary(tmp_path):
    vocab = Vocab.build(["ab\x00c", "a\x1bb"], tokenizer="char")
    assert vocab.words[4:] == ["a", "b", "c"]
    assert vocab.encode("a\x00") == [1, 4, 3, 2]  # <start> a <unk> <end>
    vocab.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json").words == vocab.words


@pytest.mark.parametrize("data,message", [
    ({"words": ["<pad>", "<start>", "<end>", "<unk>", "a"], "min_freq": "5"}, "not a capcli vocabulary"),
    ({"words": ["<pad>", "<start>", "<end>", "<unk>", "a"], "max_len": 0}, "not a capcli vocabulary"),
    ({"words": ["<pad>", "<start>", "<end>", "<unk>", "a"], "counts": {"a": -1}}, "not a capcli vocabulary"),
    ({"words": ["<pad>", "<start>", "<end>", "<unk>", "a"], "tokenizer": ["word"]}, "not a capcli vocabulary"),
    ({"words": ["<pad>", "<start>", "<end>", "<unk>"] + ["w"] * 1_000_001}, "vocabulary has 1000005 tokens, more than capcli's limit of 1000000"),
])
def test_vocabulary_files_of_the_wrong_types_or_size(tmp_path, data, message):
    path = tmp_path / "v.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CapcliError) as e:
        Vocab.load(path)
    assert one_line(e, path).startswith(message)


# =========================================================================== run folders (item 12)

def test_train_config_from_dict_checks_types_and_ranges():
    good = TrainConfig().to_dict()
    assert TrainConfig.from_dict(good) == TrainConfig()
    assert TrainConfig.from_dict({**good, "lr": 1, "min_freq": None, "seed": -3}).lr == 1  # an int is a number
    for change, message in [
        ([1, 2], "not a JSON object"),
        ({"decoder_dim": "512"}, "decoder_dim must be a whole number, not '512'"),
        ({"decoder_dim": 16000}, "decoder_dim 16000 must be a whole number from 1 to 8192"),
        ({"epochs": 2.5}, "epochs must be a whole number, not 2.5"),
        ({"fine_tune_encoder": 1}, "fine_tune_encoder must be true or false, not 1"),
        ({"data": ["x"]}, "data must be a string or null, not ['x']"),
        ({"min_freq": True}, "min_freq must be a whole number or null, not True"),
        ({"lr": math.inf}, "lr must be a number, not inf"),
        ({"lr": -1}, "lr -1 must be at least 0"),
        ({"batch_size": 0}, "batch_size 0 must be at least 1"),
        ({"workers": -2}, "workers -2 must be at least 1"),
    ]:
        data = change if isinstance(change, list) else {**good, **change}
        with pytest.raises(ValueError) as e:
            TrainConfig.from_dict(data)
        assert str(e.value) == message, change


@pytest.fixture
def run_copy(trained_model, tmp_path) -> Path:
    """A copy of the trained run folder (config.json, vocab.json, last.safetensors, ...) to tamper with."""
    run = tmp_path / "run"
    shutil.copytree(trained_model.parent, run)
    return run


def resume_error(run: Path) -> str:
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr.rstrip("\n")


def test_tampered_config_json(run_copy):
    config_path = run_copy / "config.json"
    config = json.loads(config_path.read_text())
    last = run_copy / "last.safetensors"
    for text, message in [
        (json.dumps({**config, "decoder_dim": 128}), f"decoder_dim is 128, but {last} has 64; was it changed?"),
        (json.dumps({**config, "rnn": "gru"}), f"rnn is 'gru', but {last} has 'lstm'; was it changed?"),
        (json.dumps({**config, "decoder_dim": 16000}),
         "damaged run configuration (decoder_dim 16000 must be a whole number from 1 to 8192)"),
        (json.dumps({**config, "batch_size": "16"}), "damaged run configuration (batch_size must be a whole number, not '16')"),
        (json.dumps([config]), "damaged run configuration (not a JSON object)"),
        (DEEP, "invalid JSON (nested too deeply)"),
        (json.dumps(config).replace('"epochs": 12', '"epochs": 1e999999'), "invalid JSON (a number too large)"),
    ]:
        config_path.write_text(text)
        assert resume_error(run_copy) == f"capcli: {config_path}: {message}"


def test_tampered_vocab_json(run_copy):
    vocab_path = run_copy / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    last = run_copy / "last.safetensors"
    n = len(vocab["words"])
    renamed = {**vocab, "words": vocab["words"][:-1] + ["zebra"]}
    vocab_path.write_text(json.dumps(renamed))
    assert resume_error(run_copy) == f"capcli: {vocab_path}: not the vocabulary of {last}; was it changed?"
    vocab_path.write_text(json.dumps({**vocab, "tokenizer": "char"}))
    assert resume_error(run_copy) == f"capcli: {vocab_path}: not the vocabulary of {last}; was it changed?"
    vocab_path.write_text(json.dumps({**vocab, "words": vocab["words"] + ["x"] * 5000}))
    assert resume_error(run_copy).startswith(f"capcli: {vocab_path}: vocabulary has duplicate words")
    vocab_path.write_text(json.dumps({**vocab, "words": vocab["words"][:-1] + ["a\nb"]}))
    assert resume_error(run_copy) == (f"capcli: {vocab_path}: vocabulary token {n - 1} ('a\\nb') holds a control "
                                      f"character (U+000A)")


# --------------------------------------------------------------------------- feature cache records

@pytest.mark.parametrize("record", [
    "[1, 2]",
    '{"done": "x", "bad": {}}',
    '{"done": true}',
    '{"done": 100000000000000000000000000000}',
    '{"done": 1e999999}',
    '{"done": 0, "ranges": [[1]]}',
    '{"done": 0, "ranges": [[3, 1]]}',
    '{"done": 0, "ranges": {"1": 2}}',
    '{"done": 0, "bad": ["1"]}',
    '{"done": 0, "bad": {"abc": "why"}}',
    '{"done": 0, "bad": {"' + "9" * 5000 + '": "why"}}',
    '{"done": 0, "bad": {"2": 3}}',
    DEEP,
])
def test_a_damaged_progress_record_is_a_warning_and_nothing_cached(tmp_path, caplog, record):
    cache = FeatureCache(tmp_path, "k", (8, 2, 3))
    cache.index_path.write_text('{"done": 3, "bad": {"1": "a.jpg: empty file"}}')
    cache.reload_progress()
    assert (cache.done, cache.bad) == (3, {1: "a.jpg: empty file"})  # a good record is read
    cache.index_path.write_text(record)
    again = FeatureCache(tmp_path, "k", (8, 2, 3))
    assert (again.done, again.bad, bool(again.have.any())) == (0, {}, False)
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and warnings[0].startswith(f"{cache.index_path}: ")
    assert warnings[0].endswith("; the images it recorded will be encoded again"), warnings[0]


def test_a_damaged_part_record_is_skipped_and_the_others_read(tmp_path, caplog):
    cache = FeatureCache(tmp_path, "k", (8, 2, 3))
    cache.part_path(0).write_text('{"ranges": [[4, 6]], "bad": {"5": "b.jpg: empty file"}}')
    cache.part_path(1).write_text('{"ranges": [[0, "x"]]}')
    cache.reload_progress()
    assert cache.have.tolist() == [False] * 4 + [True] * 2 + [False] * 2
    assert cache.bad == {5: "b.jpg: empty file"}
    assert [w.split(": ")[0] for w in warnings_of(caplog)] == [str(cache.part_path(1))]
