"""Greedy and batched beam search over Decoder.step."""

from __future__ import annotations

import functools

import pytest
import torch

from capcli.model.decoder import Decoder

from capcli.model.config import ModelConfig
from capcli.infer.decode import beam_search, greedy
from capcli.text.vocab import END, PAD, START, UNK

V = 40


def make_decoder(seed: int = 0, end_bias: float = 0.0, rnn: str = "lstm") -> Decoder:
    torch.manual_seed(seed)
    decoder = Decoder(ModelConfig(vocab_size=V, feature_dim=16, embed_dim=12, attention_dim=12, decoder_dim=20, rnn=rnn)).eval()
    with torch.no_grad():
        decoder.fc.weight.mul_(8)  # peaky distributions: captions of varied lengths
        decoder.fc.bias[END] += end_bias
    return decoder


def features(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 9, 16, generator=torch.Generator().manual_seed(seed))  # (B, L, D)


@functools.lru_cache(maxsize=None)
def varied_decoder(rnn: str = "lstm") -> Decoder:
    """A random decoder whose <end> bias is set so that greedy captions end at many different steps."""
    def spread(bias):
        return len({len(h.tokens) for h in greedy(make_decoder(end_bias=bias, rnn=rnn), features(8), max_len=12)})

    best = max((b / 4 for b in range(-12, 17)), key=spread)
    assert spread(best) >= 3
    return make_decoder(end_bias=best, rnn=rnn)


@pytest.mark.parametrize("varied", [True, False])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_beam_size_one_is_exactly_greedy(varied, rnn):
    decoder = varied_decoder(rnn) if varied else make_decoder(end_bias=-100.0, rnn=rnn)
    f = features(8)
    g = greedy(decoder, f, max_len=12)
    b = beam_search(decoder, f, beam_size=1, max_len=12)
    assert len({len(h.tokens) for h in g}) >= (3 if varied else 1)
    for gh, (bh,) in zip(g, b):
        assert gh.tokens == bh.tokens
        assert gh.finished == bh.finished
        assert gh.logprob == pytest.approx(bh.logprob, abs=1e-5)
        assert gh.score == pytest.approx(bh.score, abs=1e-5)
        torch.testing.assert_close(gh.alphas, bh.alphas)


@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_batched_beam_equals_one_image_at_a_time(beam_size):
    decoder, f = varied_decoder(), features(7)
    batched = beam_search(decoder, f, beam_size=beam_size, max_len=15, nbest=beam_size)
    for i in range(f.size(0)):
        alone = beam_search(decoder, f[i:i + 1], beam_size=beam_size, max_len=15, nbest=beam_size)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_beam_finds_a_caption_at_least_as_likely_as_greedy_on_average():
    decoder, f = varied_decoder(), features(20)
    g = greedy(decoder, f, max_len=15, length_penalty=0.0)
    b = beam_search(decoder, f, beam_size=5, max_len=15, length_penalty=0.0)
    assert sum(h[0].logprob for h in b) >= sum(h.logprob for h in g)
    assert sum(h[0].logprob > gh.logprob + 1e-6 for h, gh in zip(b, g)) > 0  # and sometimes strictly better


def test_no_beam_ends_within_the_limit_returns_the_cut_captions():
    decoder, f = make_decoder(end_bias=-1e4), features(3)  # <end> is never likely
    for hyps in beam_search(decoder, f, beam_size=3, max_len=6, nbest=3):
        assert len(hyps) == 3
        assert all(len(h.tokens) == 6 and not h.finished for h in hyps)
        assert all(h.alphas.shape == (6, 9) for h in hyps)


def test_special_tokens_are_never_emitted():
    decoder, f = varied_decoder(), features(5)
    with torch.no_grad():
        decoder.fc.bias[[PAD, START, UNK]] += 50  # the model "wants" them badly
    for hyp in greedy(decoder, f, max_len=10):
        assert not {PAD, START, UNK} & set(hyp.tokens)
    for hyps in beam_search(decoder, f, beam_size=4, max_len=10, nbest=4):
        for hyp in hyps:
            assert not {PAD, START, UNK, END} & set(hyp.tokens)


@pytest.mark.parametrize("penalty", [0.0, 0.7, 1.0])
def test_scores_are_length_normalised_and_sorted(penalty):
    decoder, f = varied_decoder(), features(4)
    for hyps in beam_search(decoder, f, beam_size=4, max_len=15, length_penalty=penalty, nbest=3):
        assert len(hyps) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 3  # distinct hypotheses
        for h in hyps:
            length = len(h.tokens) + h.finished
            assert h.score == pytest.approx(h.logprob / length ** penalty, rel=1e-6)
            assert h.alphas.shape == (len(h.tokens), 9)
            torch.testing.assert_close(h.alphas.sum(1), torch.ones(len(h.tokens)))


def test_bad_arguments():
    with pytest.raises(ValueError):
        beam_search(make_decoder(), features(1), beam_size=2, nbest=3)
