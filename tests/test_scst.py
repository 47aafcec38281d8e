"""Self-critical training: the CIDEr-D reward against pycocoevalcap, sampling through Decoder.step,
the sign of the policy gradient, the train-only document frequencies, --init, and SCST runs on the
synthetic shapes set (the reward rises; resume is exact; the phase starts from the best epoch)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from capcli.model import files as model_files
from capcli.train import scst
from capcli.train import validation
from capcli.metrics.cider import CiderD, document_frequencies, load_document_frequencies, save_document_frequencies
from capcli.cli import app
from capcli.model.caption_model import CaptionModel
from capcli.model.decoder import Decoder
from capcli.model.config import ModelConfig
from capcli.infer.decode import BANNED, caption_log_probs
from capcli.text.vocab import END, PAD, START, Vocab
from conftest import SMALL
from test_distributed import _env, _torchrun

BASE = ["--batch-size", "16", "--lr", "3e-3", "--min-freq", "1", "--split", "80/20/0", "--device", "cpu",
        "--save-every", "0", *SMALL]
# A run from --init takes its model settings and vocabulary from the file: no --min-freq or sizes.
INIT_BASE = ["--batch-size", "20", "--split", "80/20/0", "--device", "cpu", "--save-every", "0"]


def run_cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(a, b) -> None:
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------ CIDEr-D against pycocoevalcap

WORDS = "a the dog cat runs on grass water red ball man woman is in playing with".split()


def corpus(seed: int, images: int) -> tuple[list[list[list[str]]], list[list[str]]]:
    """Random references (5 per image) and one candidate per image, token lists ending in <end>;
    a small vocabulary, so that n-grams repeat across images and within sentences (clipping)."""
    rng = random.Random(seed)

    def sentence() -> list[str]:
        return [rng.choice(WORDS) for _ in range(rng.randint(2, 14))] + [scst.END_TOKEN]

    refs = [[sentence() for _ in range(5)] for _ in range(images)]
    candidates = [sentence() for _ in range(images)]
    candidates[0] = []  # an empty caption
    candidates[1] = refs[1][0]  # a caption equal to a reference
    candidates[2] = ["dog"] * 9  # one word repeated: clipped
    return refs, candidates


def coco_scores(scorer, refs, candidates) -> list[float]:
    for r, c in zip(refs, candidates):
        scorer += (" ".join(c), [" ".join(x) for x in r])
    return [float(x) for x in scorer.compute_score()[1]]


def test_cider_d_matches_pycocoevalcap_on_the_same_references():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    refs, candidates = corpus(0, 40)
    ours = CiderD(*document_frequencies(refs))  # pycocoevalcap counts the df of the references it scores
    mine = [ours.score(c, r) for c, r in zip(candidates, refs)]
    theirs = coco_scores(CiderScorer(n=4, sigma=6.0), refs, candidates)
    assert mine == pytest.approx(theirs, rel=0, abs=1e-9)
    assert mine[0] == 0.0 and mine[1] == max(mine) and 0 < mine[2] < 0.5 * mine[1]


def test_cider_d_with_fixed_document_frequencies_matches_pycocoevalcap_fed_them():
    """The reward's df comes from the train split, not from the references being scored: fed the
    same df, pycocoevalcap gives the same per-caption scores."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    train_refs, _ = corpus(1, 30)
    df, images = document_frequencies(train_refs)

    class FixedDf(CiderScorer):
        def compute_doc_freq(self):
            self.document_frequency.update(df)

    val_refs, val_candidates = corpus(2, 12)
    # pycocoevalcap's ref_len is log(number of items scored): score as many items as the df has images.
    picks = [k % len(val_refs) for k in range(images)]
    refs, candidates = [val_refs[k] for k in picks], [val_candidates[k] for k in picks]
    theirs = coco_scores(FixedDf(n=4, sigma=6.0), refs, candidates)
    ours = CiderD(df, images)
    mine = [ours.score(c, ours.prepare(r)) for c, r in zip(candidates, refs)]  # prepared references, as training does
    assert mine == pytest.approx(theirs, rel=0, abs=1e-9)
    assert mine != pytest.approx([CiderD(*document_frequencies(val_refs)).score(c, r) for c, r in zip(candidates, refs)])


def test_document_frequencies_file_round_trip_and_key(tmp_path):
    refs, _ = corpus(3, 10)
    df, images = document_frequencies(refs)
    path = tmp_path / "df.json"
    save_document_frequencies(path, df, images, key="abc")
    assert load_document_frequencies(path, "abc") == (df, images)
    assert load_document_frequencies(path, "another corpus") is None
    assert load_document_frequencies(tmp_path / "missing.json", "abc") is None


# ------------------------------------------------------------------ sampling and the loss

def tiny_decoder(seed: int = 0, vocab_size: int = 12) -> Decoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, feature_dim=6, embed_dim=5, attention_dim=4, decoder_dim=7, dropout=0.0)
    return Decoder(cfg)


def teacher_forced_logprobs(decoder: Decoder, features: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """log p of each token of one caption (and its <end>, if in ``tokens``) under the sampling policy."""
    captions = torch.tensor([[START, *tokens]])  # (1, T+1)
    logits, _ = decoder(features, captions, [len(tokens) + 1])  # (1, T, V)
    logp = caption_log_probs(logits[0])  # (T, V)
    return logp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)  # (T,)


def caption_of(samples: scst.Samples, row: int) -> list[int]:
    return samples.tokens[row][samples.mask[row]].tolist()


def test_samples_come_from_the_decoders_step_and_never_hold_banned_tokens():
    decoder = tiny_decoder()
    features = torch.randn(3, 4, 6)  # (B, L, D)
    s = scst.sample(decoder, features, k=4, max_len=6, generator=torch.Generator().manual_seed(0))
    N, T = s.tokens.shape
    assert N == 12 and T <= 6 and s.logprobs.shape == s.mask.shape == s.entropy.shape == (N, T)
    assert not torch.isin(s.tokens[s.mask], torch.tensor(BANNED)).any()
    assert (s.tokens[~s.mask] == PAD).all() and (s.logprobs[~s.mask] == 0).all()
    for row in range(N):
        caption = caption_of(s, row)
        assert bool(s.ended[row]) == (caption[-1] == END) and END not in caption[:-1]
        assert len(caption) == 6 or s.ended[row]
        expected = teacher_forced_logprobs(decoder, features[row // 4: row // 4 + 1], caption)
        torch.testing.assert_close(s.logprobs[row][s.mask[row]], expected)
    assert (s.entropy[s.mask] > 0).all()
    again = scst.sample(decoder, features, k=4, max_len=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, s.tokens)  # the same generator, the same captions


def test_mean_of_others_baseline():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    torch.testing.assert_close(scst.mean_of_others(rewards), torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_a_step_raises_a_sample_above_its_baseline_and_lowers_one_below(advantage):
    decoder = tiny_decoder(1)
    features = torch.randn(1, 4, 6)
    s = scst.sample(decoder, features, k=1, max_len=5, generator=torch.Generator().manual_seed(1))
    caption = caption_of(s, 0)
    before = float(s.logprobs.detach().sum())
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.05)
    scst.loss(s, torch.tensor([advantage])).backward()
    optimizer.step()
    with torch.no_grad():
        after = float(teacher_forced_logprobs(decoder, features, caption).sum())
    assert (after - before) * advantage > 0, (before, after)


def test_mean_baseline_moves_probability_from_the_worse_sample_to_the_better():
    decoder = tiny_decoder(2)
    features = torch.randn(1, 4, 6)
    s = scst.sample(decoder, features, k=2, max_len=5, generator=torch.Generator().manual_seed(3))
    better, worse = caption_of(s, 0), caption_of(s, 1)
    assert better != worse
    rewards = torch.tensor([[1.0, 0.2]])
    advantage = (rewards - scst.mean_of_others(rewards)).view(-1)  # (+0.8, -0.8)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.05)
    scst.loss(s, advantage).backward()
    optimizer.step()
    with torch.no_grad():
        gap = float(teacher_forced_logprobs(decoder, features, better).sum() - teacher_forced_logprobs(decoder, features, worse).sum())
    assert gap > float(s.logprobs[0].detach().sum() - s.logprobs[1].detach().sum())


def test_shard_losses_add_up_to_the_gradient_of_the_global_batch():
    """Under DDP each rank's loss uses the global token count and is scaled by the number of ranks:
    the average of the ranks' gradients is then the single-process gradient."""
    decoder = tiny_decoder(4)
    features = torch.randn(4, 4, 6)
    advantage = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.2, -0.2, 0.0, 0.3])

    def gradient(images: slice, rows: slice, total_tokens=None, scale=1.0) -> list[torch.Tensor]:
        decoder.zero_grad()
        s = scst.sample(decoder, features[images], k=2, max_len=5, generator=torch.Generator().manual_seed(images.start))
        scst.loss(s, advantage[rows], total_tokens, scale).backward()
        return [p.grad.clone() for p in decoder.parameters()], float(s.mask.sum())

    # the same samples either way: each shard draws from its own seeded generator
    first, n1 = gradient(slice(0, 2), slice(0, 4))
    second, n2 = gradient(slice(2, 4), slice(4, 8))
    shards = [gradient(slice(0, 2), slice(0, 4), n1 + n2, 2.0)[0], gradient(slice(2, 4), slice(4, 8), n1 + n2, 2.0)[0]]
    for a, b, g1, g2 in zip(*shards, first, second):
        torch.testing.assert_close((a + b) / 2, (g1 * n1 + g2 * n2) / (n1 + n2))


def test_reward_appends_end_to_ended_captions_only():
    refs = [["a", "red", "square", "<end>"]]
    scorer = CiderD(*document_frequencies([refs, [["a", "blue", "circle", "<end>"]]]))
    vocab = Vocab.build(["a red square"], min_freq=1)
    reward = scst.CiderReward(scorer, vocab.words, lambda row: ["a red square"])
    ids = [vocab.index[w] for w in ("a", "red", "square")]
    ended, cut = reward([0], [(ids, True), (ids, False)])
    assert ended == pytest.approx(10.0) and cut < ended  # the <end> n-grams are part of the match


# ------------------------------------------------------------------ runs

def test_scst_run_from_a_trained_model_raises_the_reward(tmp_path, shapes_dir, trained_model):
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--init", str(trained_model), "--scst-after", "0",
                  "--epochs", "4", "--scst-lr", "5e-4", "--patience", "9", *INIT_BASE)
    start, *m = metrics(run)
    assert (start["epoch"], start["phase"], start["best"]) == (0, "init", True)  # the --init model, scored first
    assert [r["phase"] for r in m] == ["scst"] * 4
    rewards = [r["train_reward"] for r in m]
    assert rewards[-1] > rewards[0] + 0.1, rewards
    assert m[-1]["train_entropy"] < m[0]["train_entropy"]
    assert m[0]["lr"] == pytest.approx(5e-4)
    assert all("val_cider" in r and "train_loss" not in r and r["reward_seconds"] < r["train_seconds"] for r in m)
    best = model_files.load_model(run / "best.safetensors")
    assert best.training["selection"] == "val_cider"
    assert best.training["val_cider"] == max(r["val_cider"] for r in [start, *m])
    assert "\tval CIDEr " in out.strip().splitlines()[-1]
    assert (run / scst.DF_FILE).is_file()


def test_scst_phase_resumes_exactly(tmp_path, shapes_dir):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    scst_options = ["--scst-after", "1", "--scst-lr", "1e-3", "--scst-samples", "3"]
    run_cli("train", "--data", str(shapes_dir), "-o", str(straight), "--epochs", "3", *scst_options, *BASE)
    run_cli("train", "--data", str(shapes_dir), "-o", str(stopped), "--epochs", "2", *scst_options, *BASE)
    assert [r["phase"] for r in metrics(stopped)] == ["xe", "scst"]
    run_cli("train", "--resume", str(stopped), "--epochs", "3")
    assert_same_weights(straight / "last.safetensors", stopped / "last.safetensors")
    a, b = metrics(straight), metrics(stopped)
    assert [r["phase"] for r in a] == ["xe", "scst", "scst"]
    assert [r.get("train_reward") for r in a] == [r.get("train_reward") for r in b]
    assert a[1]["lr"] == pytest.approx(1e-3) and a[0]["lr"] == pytest.approx(3e-3)


def test_scst_starts_from_the_best_cross_entropy_epoch(tmp_path, shapes_dir, monkeypatch):
    real = validation.validation_scores
    scores = iter([0.5, 0.3])  # epoch 1 is the best, epoch 2 is not

    def fake_cider(references, candidates, kind, cider=False):
        return {**real(references, candidates, kind), "val_cider": next(scores)}

    monkeypatch.setattr(validation, "validation_scores", fake_cider)
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--epochs", "2", "--scst-after", "2", *BASE)
    assert [r["best"] for r in metrics(run)] == [True, False]
    assert "self-critical training from epoch 3 on" in out and "weights of epoch 1" in out
    assert_same_weights(run / "best.safetensors", run / "last.safetensors")  # the weights SCST goes on from


def test_document_frequencies_count_the_train_split_only(tmp_path, shapes_dir):
    """Each image gets a caption with a word of its own: the df file holds every train image's word
    and no val or test image's."""
    table = tmp_path / "captions.csv"
    images = sorted(p.name for p in (shapes_dir / "Images").iterdir())
    splits = {name: ("train", "val", "test", "train", "train")[k % 5] for k, name in enumerate(images)}
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        for k, name in enumerate(images):
            colour, shape = name.split("_")[:2]
            w.writerow([name, f"a {colour} {shape}", splits[name]])
            w.writerow([name, f"the {shape} is {colour} marker{k}", splits[name]])
    run = tmp_path / "run"
    run_cli("train", "--captions", str(table), "--images", str(shapes_dir / "Images"), "-o", str(run), "--epochs", "1",
            "--scst-after", "0", *[a for a in BASE if a not in ("--split", "80/20/0")])
    df = json.loads((run / scst.DF_FILE).read_text())
    train = [k for k, name in enumerate(images) if splits[name] == "train"]
    assert df["images"] == len(train)
    markers = {int(g[len("marker"):]) for g in df["df"] if g.startswith("marker") and " " not in g}
    assert markers == set(train)
    assert df["df"]["a"] == len(train) and df["df"]["<end>"] == len(train)


def test_val_beam_validates_with_beam_search(tmp_path, shapes_dir, monkeypatch):
    beams = []
    real = validation.decode
    monkeypatch.setattr(validation, "decode", lambda decoder, features, options: beams.append(options.beam_size)
                        or real(decoder, features, options))
    run_cli("train", "--data", str(shapes_dir), "-o", str(tmp_path / "run"), "--epochs", "1", "--val-beam", "3", *BASE)
    assert beams and set(beams) == {3}


# ------------------------------------------------------------------ --init and refusals

def test_init_starts_from_the_models_weights_vocabulary_and_settings(tmp_path, shapes_dir, trained_model):
    run = tmp_path / "run"
    run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--init", str(trained_model), "--epochs", "1",
            "--lr", "0", "--decoder-dim", "64", *INIT_BASE)  # the model's own value may be given
    assert_same_weights(trained_model, run / "last.safetensors")  # learning rate 0: nothing moved
    source = model_files.load_model(trained_model)
    assert json.loads((run / "vocab.json").read_text())["words"] == source.vocab.words
    config = json.loads((run / "config.json").read_text())
    assert (config["decoder_dim"], config["image_size"], config["dropout"]) == (64, 64, 0.1)


def test_an_init_run_that_never_beats_its_start_keeps_the_start_as_best(tmp_path, shapes_dir, trained_model):
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--init", str(trained_model), "--scst-after", "0",
                  "--epochs", "2", "--scst-lr", "0.5", *INIT_BASE)  # a learning rate that wrecks the model
    start, *epochs = metrics(run)
    assert start["epoch"] == 0 and all(r["val_cider"] < start["val_cider"] and not r["best"] for r in epochs)
    assert "epoch 0 (the --init model): val loss" in out
    assert_same_weights(trained_model, run / "best.safetensors")
    best = model_files.load_model(run / "best.safetensors")
    assert (best.training["best_epoch"], best.training["val_cider"]) == (0, start["val_cider"])


@pytest.mark.parametrize("option, value, words", [
    ("--decoder-dim", "128", "--decoder-dim 128 contradicts --init"),
    ("--min-freq", "2", "--min-freq cannot be given with --init"),
])
def test_init_refuses_options_that_contradict_the_model(tmp_path, shapes_dir, trained_model, option, value, words):
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--init", str(trained_model), option, value,
                  *INIT_BASE, code=2)
    assert out.startswith(f"capcli: {words}") and len(out.strip().splitlines()) == 1, out
    assert not run.exists()


def test_scst_is_refused_for_char_models(tmp_path, shapes_dir):
    run = tmp_path / "run"
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(run), "--tokenizer", "char", "--scst-after", "0", code=2)
    assert out.strip() == ("capcli: --scst-after needs a word model: self-critical training rewards captions by CIDEr, "
                           "and this run's tokenizer is char")
    assert not run.exists()
    # a char model given with --init: refused once its tokenizer is known, before any data is read
    vocab = Vocab.build(["a red square"], min_freq=1, tokenizer="char")
    model = CaptionModel(ModelConfig(vocab_size=len(vocab), image_size=64, embed_dim=8, attention_dim=8, decoder_dim=8))
    path = tmp_path / "char.safetensors"
    model_files.save_model(path, model, vocab, encoder_weights="test")
    out = run_cli("train", "--data", str(tmp_path / "no-data"), "-o", str(run), "--init", str(path), "--scst-after", "0",
                  code=2)
    assert "this run's tokenizer is char" in out


def test_mean_baseline_needs_two_samples(tmp_path, shapes_dir):
    out = run_cli("train", "--data", str(shapes_dir), "-o", str(tmp_path / "run"), "--scst-after", "0",
                  "--scst-samples", "1", code=2)
    assert "--scst-samples must be at least 2" in out


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_scst_under_torchrun_keeps_the_processes_in_step(tmp_path, shapes_dir, trained_model):
    """Two gloo processes, the greedy baseline: every step leaves both with the same weights."""
    run = tmp_path / "run"
    result = _torchrun(["train", "--data", str(shapes_dir), "-o", str(run), "--init", str(trained_model), "--scst-after",
                        "0", "--epochs", "1", "--scst-baseline", "greedy", *INIT_BASE],
                       env=_env(CAPCLI_DEBUG_SYNC_CHECK="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "were identical after each of" in result.stderr
    start, record = metrics(run)  # the --init model (epoch 0), then the one epoch
    assert start["phase"] == "init" and "val_cider" in start
    assert record["phase"] == "scst" and record["train_reward"] > 0
