"""The LSTM/GRU decoder and its single step.

Shapes: B batch, L grid cells (h*w), D feature channels, A attention size, H decoder size,
E word-embedding size, V vocabulary size, T caption steps.

``Decoder.step`` is the single place a word is decoded: teacher-forced training
(``Decoder.forward``), greedy and beam search (capcli.infer.decode) and self-critical sampling
(capcli.train.scst) all call it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from capcli.model.attention import ATTENTION_TYPES
from capcli.model.config import ModelConfig


class DecoderState(NamedTuple):
    h: torch.Tensor  # (B, H)
    c: torch.Tensor | None  # (B, H) for the LSTM, None for the GRU
    features: torch.Tensor  # (B, L, D)
    keys: torch.Tensor  # (B, L, A) attention keys, computed once per image

    def select(self, index) -> "DecoderState":
        """Rows ``index`` (a slice or an index tensor) of every part: used to shrink and reorder beams."""
        return DecoderState(*(None if t is None else t[index] for t in self))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, E, V = cfg.feature_dim, cfg.decoder_dim, cfg.embed_dim, cfg.vocab_size
        self.attention = ATTENTION_TYPES[cfg.attention](D, H, cfg.attention_dim)
        self.embedding = nn.Embedding(V, E)
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H) if cfg.rnn == "lstm" else None
        self.f_beta = nn.Linear(H, D)  # gate on the context (Show-Attend-Tell, section 4.2.1)
        self.rnn = nn.LSTMCell(E + D, H) if cfg.rnn == "lstm" else nn.GRUCell(E + D, H)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(H, V)

    def init_state(self, features: torch.Tensor) -> DecoderState:
        mean = features.mean(1)  # (B, D)
        h = self.init_h(mean)  # (B, H)
        c = self.init_c(mean) if self.init_c is not None else None  # (B, H)
        return DecoderState(h, c, features, self.attention.keys(features))

    def step(self, state: DecoderState, prev_words: torch.Tensor):
        """One word: (state, previous words (B,)) -> (logits (B, V), new state, alpha (B, L))."""
        alpha = torch.softmax(self.attention.scores(state.keys, state.h).float(), dim=1).to(state.features.dtype)  # (B, L)
        context = torch.bmm(alpha.unsqueeze(1), state.features).squeeze(1)  # (B, D)
        gate = torch.sigmoid(self.f_beta(state.h))  # (B, D)
        x = torch.cat([self.embedding(prev_words), gate * context], dim=1)  # (B, E + D)
        if state.c is not None:
            h, c = self.rnn(x, (state.h, state.c))  # (B, H), (B, H)
        else:
            h, c = self.rnn(x, state.h), None  # (B, H)
        logits = self.fc(self.dropout(h))  # (B, V)
        return logits, DecoderState(h, c, state.features, state.keys), alpha

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: list[int]):
        """Teacher forcing over captions sorted by length, longest first.

        features (B, L, D); captions (B, T+1) = <start> w1 .. wn <end> <pad>..; lengths[i] = n_i + 2.
        Returns logits (B, T, V) and alphas (B, T, L); positions past a caption's end stay zero and
        are never computed: at step t only the captions still running are decoded.
        """
        B, steps = captions.size(0), lengths[0] - 1
        state = self.init_state(features)
        logits = features.new_zeros(B, steps, self.fc.out_features)  # (B, T, V)
        alphas = features.new_zeros(B, steps, features.size(1))  # (B, T, L)
        for t in range(steps):
            n = sum(length - 1 > t for length in lengths)  # captions still running
            step_logits, state, alpha = self.step(state.select(slice(0, n)), captions[:n, t])
            logits[:n, t] = step_logits  # (n, V)
            alphas[:n, t] = alpha  # (n, L)
        return logits, alphas
