"""Greedy and batched beam search, both driving ``Decoder.step``.

Neither ever emits <pad>, <start> or <unk>: they are left out of the softmax
(``caption_log_probs``, the policy self-critical training samples from too). A caption that
reaches ``max_len`` words without <end> is returned as it stands.
Scores are length-normalised: score = sum of log-probabilities / length ** length_penalty, where
length counts the words plus the closing <end>.

With ``no_repeat_ngram`` n > 0, a word that would complete an n-gram already in its caption is
blocked (log-probability -inf), as Hugging Face's ``no_repeat_ngram_size`` does: it stops greedy
loops like "... and a blue shirt and a blue shirt ...". <end> is never blocked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capcli.model.decoder import Decoder, DecoderState
from capcli.text.vocab import END, PAD, START, UNK

BANNED = (PAD, START, UNK)


@dataclass(frozen=True)
class DecodeOptions:
    """How captions are searched for: the same options for the CLI, the Python API and evaluate."""

    beam_size: int = 1  # 1: greedy
    nbest: int = 1  # hypotheses to return per image, best first (<= beam_size)
    max_len: int | None = None  # longest output, in tokens; None: the tokenizer's default (30 words, 100 SMILES tokens...)
    length_penalty: float = 1.0  # score = log-probability / length ** length_penalty
    no_repeat_ngram: int | None = None  # never repeat an n-gram of this many tokens; 0: off; None: the tokenizer's default

    def __post_init__(self) -> None:
        if self.beam_size < 1 or (self.max_len is not None and self.max_len < 1):
            raise ValueError("beam_size and max_len must be at least 1")
        if self.no_repeat_ngram is not None and self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram {self.no_repeat_ngram} must be 0 (off) or more")
        if not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"nbest {self.nbest} must be between 1 and beam_size {self.beam_size}")


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    logprob: float  # sum of the log-probabilities of the words (and <end>, if it ended)
    score: float  # logprob / length ** length_penalty
    alphas: torch.Tensor  # (len(tokens), L) attention weights of each word, on the CPU
    finished: bool  # ended with <end> (False: cut at max_len)


def _normalise(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / max(length, 1) ** length_penalty


def caption_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The one banned-token policy, for search and self-critical sampling alike: log-softmax over
    the tokens a caption may hold (never <pad>, <start> or <unk>), renormalised over them.
    logits (N, V) -> (N, V)."""
    banned = torch.tensor(BANNED, device=logits.device)
    return torch.log_softmax(logits.float().index_fill(-1, banned, float("-inf")), dim=-1)  # (N, V)


def block_repeats(log_probs: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """``log_probs`` with every token that would complete an n-gram already in its row's
    ``history`` set to -inf (n < 1: unchanged). log_probs (R, V), history (R, t) -> (R, V).

    Histories hold words only, never <end>, so <end> is never blocked: a row whose every word is
    blocked can still end.
    """
    t = history.size(1)
    if n < 1 or t < n:
        return log_probs
    grams = history.unfold(1, n, 1)  # (R, t-n+1, n): every n-gram so far
    tail = history[:, t - n + 1:]  # (R, n-1): the words the next one would make an n-gram with
    seen = (grams[..., :-1] == tail.unsqueeze(1)).all(dim=2)  # (R, t-n+1): n-grams that start like that
    # Counted rather than set: a word may close several such n-grams, and a scatter of booleans
    # with repeated indices keeps an arbitrary one of them.
    hits = torch.zeros_like(log_probs).scatter_add_(1, grams[..., -1], seen.to(log_probs.dtype))  # (R, V)
    return log_probs.masked_fill(hits > 0, float("-inf"))  # (R, V)


@torch.no_grad()
def greedy(decoder: Decoder, features: torch.Tensor, max_len: int = 30, length_penalty: float = 1.0,
           no_repeat_ngram: int = 0) -> list[Hypothesis]:
    """The most likely word at every step (never one that repeats a ``no_repeat_ngram``-gram).
    features (B, L, D) -> one Hypothesis per image."""
    B = features.size(0)
    state = decoder.init_state(features)
    words = torch.full((B,), START, dtype=torch.long, device=features.device)  # (n,)
    rows = torch.arange(B, device=features.device)  # (n,) image index of each running row
    total = torch.zeros(B, device=features.device)  # (n,) float32 running log-probability
    history = torch.zeros(B, 0, dtype=torch.long, device=features.device)  # (n, t) words so far, for the guard
    trace = []  # per step: (rows, words, alphas, totals)
    for _ in range(max_len):
        logits, state, alpha = decoder.step(state, words)  # (n, V), state, (n, L)
        lp, words = block_repeats(caption_log_probs(logits), history, no_repeat_ngram).max(dim=1)  # (n,), (n,)
        total = total + lp  # (n,)
        trace.append((rows, words, alpha, total))
        history = torch.cat([history, words.unsqueeze(1)], dim=1)  # (n, t+1)
        running = words != END  # (n,)
        if not running.all():
            rows, words, total, history = rows[running], words[running], total[running], history[running]
            state = state.select(running)
            if rows.numel() == 0:
                break
    tokens: list[list[int]] = [[] for _ in range(B)]
    alphas: list[list[torch.Tensor]] = [[] for _ in range(B)]
    logprob, ended = [0.0] * B, [False] * B
    for step_rows, step_words, step_alpha, step_total in trace:
        step_alpha = step_alpha.float().cpu()
        for r, w, a, s in zip(step_rows.tolist(), step_words.tolist(), step_alpha, step_total.tolist()):
            logprob[r] = s
            if w == END:
                ended[r] = True
            else:
                tokens[r].append(w)
                alphas[r].append(a)
    L = features.size(1)
    return [
        Hypothesis(
            tokens[b], logprob[b],
            _normalise(logprob[b], len(tokens[b]) + ended[b], length_penalty),
            torch.stack(alphas[b]) if alphas[b] else torch.zeros(0, L), ended[b],
        )
        for b in range(B)
    ]


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    features: torch.Tensor,
    beam_size: int = 3,
    max_len: int = 30,
    length_penalty: float = 1.0,
    nbest: int = 1,
    no_repeat_ngram: int = 0,
) -> list[list[Hypothesis]]:
    """Beam search over B images at once: B x K beams decode as one (B*K)-row batch.

    Each image stops when K of its hypotheses have ended (then it leaves the batch), or at
    ``max_len`` (its live beams are then returned as they stand). Returns, per image, the
    ``nbest`` best hypotheses by length-normalised score. No beam ever repeats a
    ``no_repeat_ngram``-gram (0: off).
    """
    K = beam_size
    if K < 1 or not 1 <= nbest <= K:
        raise ValueError("need beam_size >= 1 and 1 <= nbest <= beam_size")
    B, L, _ = features.shape
    dev = features.device
    state = decoder.init_state(features).select(torch.arange(B, device=dev).repeat_interleave(K))  # B*K rows
    scores = torch.full((B, K), float("-inf"), device=dev)  # (n, K) running log-probability
    scores[:, 0] = 0.0  # one live beam to start with: the others would only repeat it
    words = torch.full((B * K,), START, dtype=torch.long, device=dev)  # (n*K,)
    history = torch.zeros(B * K, 0, dtype=torch.long, device=dev)  # (n*K, t) words so far
    attention = torch.zeros(B * K, 0, L, device=dev)  # (n*K, t, L)
    images = list(range(B))  # image index of each running group of K rows
    done: list[list[Hypothesis]] = [[] for _ in range(B)]

    for t in range(max_len):
        logits, state, alpha = decoder.step(state, words)  # (n*K, V), state, (n*K, L)
        n, V = len(images), logits.size(1)
        log_probs = block_repeats(caption_log_probs(logits), history, no_repeat_ngram)  # (n*K, V)
        candidates = (scores.view(n * K, 1) + log_probs).view(n, K * V)  # (n, K*V)
        top, index = candidates.topk(2 * K, dim=1)  # (n, 2K): at most K of them can be <end>
        parent = torch.div(index, V, rounding_mode="floor") + torch.arange(n, device=dev).unsqueeze(1) * K  # (n, 2K) row
        word = index % V  # (n, 2K)
        is_end = word == END  # (n, 2K)

        # Hypotheses that end here, if they rank among the top K candidates.
        for i, j in (is_end[:, :K] & torch.isfinite(top[:, :K])).nonzero().tolist():
            row, logprob = int(parent[i, j]), float(top[i, j])
            done[images[i]].append(Hypothesis(
                history[row].tolist(), logprob, _normalise(logprob, t + 1, length_penalty),
                attention[row].float().cpu(), True,
            ))

        # The K best candidates that go on.
        going_on = ~is_end
        keep = going_on & (going_on.cumsum(dim=1) <= K)  # (n, 2K), exactly K per image
        rows = parent[keep]  # (n*K,)
        scores = top[keep].view(n, K)  # (n, K)
        words = word[keep]  # (n*K,)
        history = torch.cat([history[rows], words.unsqueeze(1)], dim=1)  # (n*K, t+1)
        attention = torch.cat([attention[rows], alpha[rows].unsqueeze(1)], dim=1)  # (n*K, t+1, L)
        # A beam's parent is a beam of the same image, whose K rows share features and keys:
        # only the recurrent state moves (copying the features every step would dominate).
        state = DecoderState(state.h[rows], None if state.c is None else state.c[rows], state.features, state.keys)

        # Images with K finished hypotheses leave the batch.
        finished = torch.tensor([len(done[b]) >= K for b in images], device=dev)  # (n,)
        if finished.any():
            still = ~finished
            images = [b for b, f in zip(images, finished.tolist()) if not f]
            if not images:
                break
            row_mask = still.repeat_interleave(K)  # (n*K,)
            scores, words = scores[still], words[row_mask]
            history, attention = history[row_mask], attention[row_mask]
            state = state.select(row_mask)

    if images and len(images) * K == history.size(0):
        _add_cut_beams(done, images, scores, history, attention, length_penalty)
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in done]


def _add_cut_beams(done: list[list[Hypothesis]], images: list[int], scores: torch.Tensor, history: torch.Tensor,
                   attention: torch.Tensor, length_penalty: float) -> None:
    """Images still running at max_len: their live beams count as (unfinished) hypotheses.
    scores (n, K), history (n*K, t), attention (n*K, t, L)."""
    K = scores.size(1)
    for i, b in enumerate(images):
        for k in range(K):
            row, logprob = i * K + k, float(scores[i, k])
            if logprob > float("-inf"):  # a beam that never had a live word (or only blocked ones)
                done[b].append(Hypothesis(
                    history[row].tolist(), logprob, _normalise(logprob, history.size(1), length_penalty),
                    attention[row].float().cpu(), False,
                ))


def decode(decoder: Decoder, features: torch.Tensor, options: DecodeOptions) -> list[list[Hypothesis]]:
    """features (B, L, D) -> per image, ``options.nbest`` hypotheses, best first: greedy at beam size 1.
    A ``no_repeat_ngram`` of None is off here: only the Captioner knows the tokenizer whose default it means."""
    if options.max_len is None:
        raise ValueError("decode needs options.max_len (the Captioner fills in its tokenizer's default)")
    ngram = options.no_repeat_ngram or 0
    if options.beam_size == 1:
        return [[h] for h in greedy(decoder, features, options.max_len, options.length_penalty, ngram)]
    return beam_search(decoder, features, options.beam_size, options.max_len, options.length_penalty, options.nbest,
                       ngram)
