"""Greedy and batched beam search, both driving ``Decoder.step``.

Neither ever emits <pad>, <start> or <unk>: their log-probabilities are set to -inf before a
word is chosen. A caption that reaches ``max_len`` words without <end> is returned as it stands.
Scores are length-normalised: score = sum of log-probabilities / length ** length_penalty, where
length counts the words plus the closing <end>.
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

    def __post_init__(self) -> None:
        if self.beam_size < 1 or (self.max_len is not None and self.max_len < 1):
            raise ValueError("beam_size and max_len must be at least 1")
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


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    logp[:, BANNED] = float("-inf")
    return logp


@torch.no_grad()
def greedy(decoder: Decoder, features: torch.Tensor, max_len: int = 30, length_penalty: float = 1.0) -> list[Hypothesis]:
    """The most likely word at every step. features (B, L, D) -> one Hypothesis per image."""
    B = features.size(0)
    state = decoder.init_state(features)
    words = torch.full((B,), START, dtype=torch.long, device=features.device)  # (n,)
    rows = torch.arange(B, device=features.device)  # (n,) image index of each running row
    total = torch.zeros(B, device=features.device)  # (n,) float32 running log-probability
    trace = []  # per step: (rows, words, alphas, totals)
    for _ in range(max_len):
        logits, state, alpha = decoder.step(state, words)  # (n, V), state, (n, L)
        lp, words = _log_probs(logits).max(dim=1)  # (n,), (n,)
        total = total + lp  # (n,)
        trace.append((rows, words, alpha, total))
        running = words != END  # (n,)
        if not running.all():
            rows, words, total = rows[running], words[running], total[running]
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
) -> list[list[Hypothesis]]:
    """Beam search over B images at once: B x K beams decode as one (B*K)-row batch.

    Each image stops when K of its hypotheses have ended (then it leaves the batch), or at
    ``max_len`` (its live beams are then returned as they stand). Returns, per image, the
    ``nbest`` best hypotheses by length-normalised score.
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
        candidates = (scores.view(n * K, 1) + _log_probs(logits)).view(n, K * V)  # (n, K*V)
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

    # Images still running at max_len: their live beams count as (unfinished) hypotheses.
    if images and len(images) * K == history.size(0):
        for i, b in enumerate(images):
            for k in range(K):
                row, logprob = i * K + k, float(scores[i, k])
                if logprob > float("-inf"):
                    done[b].append(Hypothesis(
                        history[row].tolist(), logprob, _normalise(logprob, history.size(1), length_penalty),
                        attention[row].float().cpu(), False,
                    ))
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in done]


def decode(decoder: Decoder, features: torch.Tensor, options: DecodeOptions) -> list[list[Hypothesis]]:
    """features (B, L, D) -> per image, ``options.nbest`` hypotheses, best first: greedy at beam size 1."""
    if options.max_len is None:
        raise ValueError("decode needs options.max_len (the Captioner fills in its tokenizer's default)")
    if options.beam_size == 1:
        return [[h] for h in greedy(decoder, features, options.max_len, options.length_penalty)]
    return beam_search(decoder, features, options.beam_size, options.max_len, options.length_penalty, options.nbest)
