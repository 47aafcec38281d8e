"""capcli export --format onnx: the graphs run in ONNX Runtime and give capcli's own numbers, down to
the same greedy captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from capcli.infer.captioner import Captioner
from capcli.model.caption_model import CaptionModel
from capcli.model.config import ModelConfig
from capcli.model.export import export_onnx
from capcli.text.vocab import SPECIALS, Vocab
from conftest import run_cli

ort = pytest.importorskip("onnxruntime")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def greedy_with_onnx(folder, images: np.ndarray, max_len: int) -> list[list[int]]:
    """Greedy decoding written against the exported graphs alone, as another runtime would."""
    config = json.loads((folder / "config.json").read_text())
    encoder, init, step = (session(folder / config["graphs"][k]) for k in ("encoder", "init", "step"))
    features = encoder.run(None, {"images": images})[0]  # (B, L, D)
    state = dict(zip([o.name for o in init.get_outputs()], init.run(None, {"features": features})))
    words = np.full(len(images), config["special_tokens"]["<start>"], dtype=np.int64)
    out = [[] for _ in images]
    done = np.zeros(len(images), dtype=bool)
    for _ in range(max_len):
        feeds = {"words": words, "features": features, **state}
        result = dict(zip([o.name for o in step.get_outputs()], step.run(None, feeds)))
        words = result["logits"].argmax(1)
        state = {k[:-4]: v for k, v in result.items() if k.endswith("_out")} | {"keys": state["keys"]}
        for i, w in enumerate(words):
            if not done[i] and w == config["special_tokens"]["<end>"]:
                done[i] = True
            elif not done[i]:
                out[i].append(int(w))
        if done.all():
            break
    return out


def test_exported_graphs_caption_as_capcli_does(trained_model, shapes_dir, tmp_path):
    r = run_cli("-q", "export", "-m", str(trained_model), "-o", str(tmp_path / "onnx"))
    assert r.exit_code == 0, r.output
    names = ["encoder.onnx", "init.onnx", "step.onnx", "config.json", "vocab.json"]
    assert r.stdout.splitlines() == [str(tmp_path / "onnx" / n) for n in names]
    cap = Captioner.load(trained_model, "cpu", "fp32", "torch")
    assert Vocab.load(tmp_path / "onnx" / "vocab.json").words == cap.vocab.words
    paths = sorted((shapes_dir / "Images").glob("*.png"))[::4]
    from capcli.data.images import image_to_tensor, load_image

    cfg = cap.cfg
    x = torch.stack([image_to_tensor(load_image(p), cfg.image_size, cfg.mean, cfg.std) for p in paths])
    features = session(tmp_path / "onnx" / "encoder.onnx").run(None, {"images": x.numpy()})[0]
    assert np.allclose(features, cap.encode(x).numpy(), atol=1e-4)
    ours = [r.tokens for r in cap.caption([str(p) for p in paths])]
    theirs = greedy_with_onnx(tmp_path / "onnx", x.numpy(), max_len=30)
    assert [[cap.vocab.words[i] for i in t] for t in theirs] == ours


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_the_step_graph_is_decoder_step(tmp_path, rnn):
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(vocab_size=12, image_size=64, embed_dim=8, attention_dim=8, decoder_dim=16, rnn=rnn)).eval()
    vocab = Vocab(list(SPECIALS) + [f"w{i}" for i in range(8)], {}, 1, 20, "word")
    export_onnx(model, vocab, tmp_path)
    features = torch.randn(3, 4, model.cfg.feature_dim)  # (3, L, D): another batch size than exported with
    with torch.no_grad():
        state = model.decoder.init_state(features)
        logits, new, alpha = model.decoder.step(state, torch.tensor([1, 5, 7]))
    init_out = session(tmp_path / "init.onnx").run(None, {"features": features.numpy()})
    assert np.allclose(init_out[0], state.h.numpy(), atol=1e-5) and np.allclose(init_out[-1], state.keys.numpy(), atol=1e-5)
    feeds = {"words": np.array([1, 5, 7]), "h": state.h.numpy(), "features": features.numpy(), "keys": state.keys.numpy()}
    if rnn == "lstm":
        feeds["c"] = state.c.numpy()
    out = dict(zip([o.name for o in session(tmp_path / "step.onnx").get_outputs()],
                   session(tmp_path / "step.onnx").run(None, feeds)))
    assert set(out) == ({"logits", "h_out", "c_out", "alpha"} if rnn == "lstm" else {"logits", "h_out", "alpha"})
    assert np.allclose(out["logits"], logits.numpy(), atol=1e-5)
    assert np.allclose(out["h_out"], new.h.numpy(), atol=1e-5)
    assert np.allclose(out["alpha"], alpha.numpy(), atol=1e-6)


def test_export_to_a_place_that_cannot_be_written_is_one_line(trained_model, tmp_path):
    (tmp_path / "file").write_text("")
    r = run_cli("export", "-m", str(trained_model), "-o", str(tmp_path / "file" / "onnx"))
    assert r.exit_code == 2  # as for every output capcli cannot write
    assert r.stderr.startswith(f"capcli: {tmp_path / 'file' / 'onnx'}") and r.stderr.count("\n") == 1
