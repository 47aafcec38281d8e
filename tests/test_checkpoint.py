"""Model files: safetensors round trip with complete metadata, fp16 export, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from capcli.model import files as model_files
from capcli.files import atomic_write
from capcli.model.caption_model import CaptionModel
from capcli.model.config import ModelConfig
from capcli.text.vocab import Vocab


@pytest.fixture()
def model_and_vocab():
    torch.manual_seed(0)
    vocab = Vocab.build(["a red square", "a blue circle", "the square is red"], min_freq=1)
    cfg = ModelConfig(vocab_size=len(vocab), attention="dot", rnn="gru", grid=3, embed_dim=8, attention_dim=8, decoder_dim=12)
    return CaptionModel(cfg), vocab


def test_round_trip_keeps_weights_config_and_vocabulary(tmp_path, model_and_vocab):
    model, vocab = model_and_vocab
    path = tmp_path / "m.safetensors"
    model_files.save_model(path, model, vocab, encoder_weights="pypi:test", training={"epochs": 3, "val_bleu4": 0.25})
    loaded = model_files.load_model(path)
    assert loaded.model.cfg == model.cfg
    assert loaded.vocab.words == vocab.words
    assert loaded.training == {"epochs": 3, "val_bleu4": 0.25}
    assert loaded.metadata["encoder_weights"] == "pypi:test"
    assert not loaded.model.training  # ready for inference
    original = model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    # the same outputs
    x = torch.randn(1, 3, 96, 96)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encoder(x), model.encoder(x))


def test_fp16_export_is_half_the_size_and_loads_as_float32(tmp_path, model_and_vocab):
    model, vocab = model_and_vocab
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    model_files.save_model(full, model, vocab, encoder_weights="x")
    model_files.save_model(half, model, vocab, encoder_weights="x", dtype=torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded = model_files.load_model(half)
    w = loaded.model.decoder.fc.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, model.decoder.fc.weight, atol=1e-3, rtol=1e-3)


def test_metadata_is_readable_without_loading_tensors(tmp_path, model_and_vocab):
    model, vocab = model_and_vocab
    path = tmp_path / "m.safetensors"
    model_files.save_model(path, model, vocab, encoder_weights="x")
    meta = model_files.read_metadata(path)
    assert meta["format"] == "capcli-model"
    assert json.loads(meta["config"])["attention"] == "dot"
    assert json.loads(meta["vocab"])["words"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]


def test_failed_write_leaves_the_previous_file_intact(tmp_path, model_and_vocab):
    model, vocab = model_and_vocab
    path = tmp_path / "m.safetensors"
    model_files.save_model(path, model, vocab, encoder_weights="first")
    before = path.read_bytes()

    def disk_full(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, disk_full)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert model_files.load_model(path).metadata["encoder_weights"] == "first"


def test_written_files_get_normal_permissions(tmp_path, model_and_vocab):
    import os

    model, vocab = model_and_vocab
    path = tmp_path / "m.safetensors"
    model_files.save_model(path, model, vocab, encoder_weights="x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_header_lengths_of_any_first_byte_are_read_as_safetensors(tmp_path):
    """A safetensors file starts with its header length: 128 mod 256 makes the first byte 0x80,
    a pickle's first byte. Such files used to be refused as pickles (about 1 save in 32)."""
    from safetensors.torch import save_file

    first_bytes = set()
    for k in range(0, 600, 3):  # header lengths over more than two multiples of 256
        path = tmp_path / f"m{k}.safetensors"
        metadata = {"format": model_files.FORMAT, "format_version": model_files.FORMAT_VERSION, "note": "x" * k}
        save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
        first_bytes.add(path.read_bytes()[0])
        assert model_files.read_metadata(path)["note"] == "x" * k
    assert 0x80 in first_bytes


def test_model_whose_header_length_starts_with_0x80_loads(tmp_path, model_and_vocab):
    model, vocab = model_and_vocab
    path = tmp_path / "m.safetensors"
    model_files.save_model(path, model, vocab, encoder_weights="x", training={"note": ""})
    n = int.from_bytes(path.read_bytes()[:8], "little")
    pad = (128 - n) % 256
    for extra in range(pad, pad + 16):  # safetensors pads its header to a multiple of 8
        model_files.save_model(path, model, vocab, encoder_weights="x", training={"note": "y" * extra})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    loaded = model_files.load_model(path)
    assert loaded.training["note"] == "y" * extra
    assert loaded.vocab.words == vocab.words


def test_atomic_write_syncs_the_file_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    import os
    import stat

    from capcli import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or real_fsync(fd))
    monkeypatch.setattr(files.os, "replace", lambda a, b: events.append("rename") or real_replace(a, b))
    atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"data"))
    assert events == ["file", "rename", "dir"]
    assert (tmp_path / "x.bin").read_bytes() == b"data"
