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


# --------------------------------------------------------------------------- the n-gram repetition guard

def looping_decoder() -> Decoder:
    """A decoder that always wants the same few words, in the same order, and never <end>: left
    alone it says "4 4 4 ..." (the rows differ only through attention, which the zeroed fc ignores)."""
    decoder = make_decoder(end_bias=-1e4)
    with torch.no_grad():
        decoder.fc.weight.zero_()
        decoder.fc.bias.copy_(-0.1 * torch.arange(V, dtype=torch.float))  # 4 over 5 over 6 ...
        decoder.fc.bias[END] = -1e4
    return decoder


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeats(tokens: list[int], n: int) -> bool:
    grams = ngrams(tokens, n)
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_guard_never_repeats_an_ngram(n):
    decoder, f = looping_decoder(), features(3)
    assert all(h.tokens == [4] * 12 for h in greedy(decoder, f, max_len=12))  # the rig loops unguarded
    for h in greedy(decoder, f, max_len=12, no_repeat_ngram=n):
        assert len(h.tokens) == 12 and not repeats(h.tokens, n)
    for hyps in beam_search(decoder, f, beam_size=3, max_len=12, nbest=3, no_repeat_ngram=n):
        assert len(hyps) == 3
        for h in hyps:
            assert len(h.tokens) == 12 and not repeats(h.tokens, n)
            assert h.logprob > float("-inf") and not {PAD, START, UNK, END} & set(h.tokens)


def test_the_guard_on_a_varied_decoder_and_beam_one_still_is_greedy():
    decoder, f = varied_decoder(), features(8)
    g = greedy(decoder, f, max_len=15, no_repeat_ngram=2)
    b = beam_search(decoder, f, beam_size=1, max_len=15, no_repeat_ngram=2)
    for gh, (bh,) in zip(g, b):
        assert not repeats(gh.tokens, 2)
        assert gh.tokens == bh.tokens and gh.finished == bh.finished
        assert gh.logprob == pytest.approx(bh.logprob, abs=1e-5)
    for hyps in beam_search(decoder, f, beam_size=4, max_len=15, nbest=4, no_repeat_ngram=2):
        assert all(not repeats(h.tokens, 2) for h in hyps)


def test_a_row_with_every_word_blocked_ends():
    """n=1 allows each word once: after the V-4 words that are neither specials nor <end>, only
    <end> is left, however unlikely the model finds it."""
    decoder, f = looping_decoder(), features(2)
    words = V - 4
    for h in greedy(decoder, f, max_len=60, no_repeat_ngram=1):
        assert h.finished and sorted(h.tokens) == list(range(4, V))
        assert h.logprob > float("-inf") and h.alphas.shape == (words, 9)
    for hyps in beam_search(decoder, f, beam_size=2, max_len=60, nbest=2, no_repeat_ngram=1):
        assert hyps and all(h.finished and sorted(h.tokens) == list(range(4, V)) for h in hyps)


def test_captions_without_repeats_are_unchanged_by_the_guard():
    decoder, f = varied_decoder(), features(20)
    plain = greedy(decoder, f, max_len=15)
    guarded = greedy(decoder, f, max_len=15, no_repeat_ngram=3)
    assert any(repeats(h.tokens, 3) for h in plain) and any(not repeats(h.tokens, 3) for h in plain)
    for p, g in zip(plain, guarded):
        if not repeats(p.tokens, 3):
            assert (g.tokens, g.finished) == (p.tokens, p.finished)
            assert (g.logprob, g.score) == (p.logprob, p.score)
            torch.testing.assert_close(g.alphas, p.alphas)
    # Beam search: when no beam ever held a repeat, nothing was blocked and the beams are the same.
    short = dict(beam_size=3, max_len=4, nbest=3)
    plain_beams = beam_search(decoder, f, **short)
    assert not any(repeats(h.tokens, 3) for hyps in plain_beams for h in hyps)
    for p, g in zip(plain_beams, beam_search(decoder, f, no_repeat_ngram=3, **short)):
        assert [(h.tokens, h.score) for h in g] == [(h.tokens, h.score) for h in p]


def guard_captioner(tokenizer: str):
    """A Captioner of the looping decoder with a ``tokenizer`` vocabulary (V tokens)."""
    from capcli.infer.captioner import Captioner
    from capcli.text.vocab import SPECIALS, Vocab

    captioner = Captioner.__new__(Captioner)
    captioner.vocab = Vocab(list(SPECIALS) + [f"t{i}" for i in range(4, V)], {}, 1, 50, tokenizer)
    captioner.model = type("M", (), {"decoder": looping_decoder()})()
    return captioner


@pytest.mark.parametrize("tokenizer", ["word", "char", "smiles"])
def test_the_guard_is_on_for_words_and_off_for_characters_and_smiles_by_default(tokenizer):
    from capcli.infer.decode import DecodeOptions
    from capcli.text.tokenizers import DEFAULT_NO_REPEAT_NGRAM

    captioner, f = guard_captioner(tokenizer), features(2)
    default = DEFAULT_NO_REPEAT_NGRAM[tokenizer]
    assert (default > 0) == (tokenizer == "word")
    for k in (1, 3):
        by_default = [h.tokens for hyps in captioner.decode(f, DecodeOptions(beam_size=k, max_len=10)) for h in hyps]
        off = [h.tokens for hyps in captioner.decode(f, DecodeOptions(beam_size=k, max_len=10, no_repeat_ngram=0)) for h in hyps]
        asked = [h.tokens for hyps in captioner.decode(f, DecodeOptions(beam_size=k, max_len=10, no_repeat_ngram=2)) for h in hyps]
        assert all(repeats(t, 2) for t in off)  # 0 turns it off, for every tokenizer
        assert all(not repeats(t, 2) for t in asked)  # and any model gets it when asked
        if default:
            assert all(not repeats(t, default) for t in by_default)
        else:
            assert by_default == off


def test_decode_options_refuse_a_negative_ngram():
    from capcli.infer.decode import DecodeOptions

    with pytest.raises(ValueError):
        DecodeOptions(no_repeat_ngram=-1)
    assert DecodeOptions().no_repeat_ngram is None  # the tokenizer's default
