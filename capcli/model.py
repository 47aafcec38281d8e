"""The Show-Attend-Tell model: CNN encoder -> soft attention -> LSTM/GRU decoder, and its loss.

Shapes: B batch, S image side, L grid cells (h*w), D feature channels, A attention size,
H decoder size, E word-embedding size, V vocabulary size, T caption steps.

``Decoder.step`` is the single place a word is decoded: teacher-forced training
(``Decoder.forward``), greedy and beam search (capcli.sampling) all call it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from capcli.choices import MODEL_LIMITS, check_names, model_setting_problem, shown
from capcli.encoders import Encoder
from capcli.errors import CapcliError



@dataclass
class ModelConfig:
    vocab_size: int
    encoder: str = "lite0"
    image_size: int = 224  # images are resized to image_size x image_size
    grid: int = 0  # pool the feature map to grid x grid; 0 keeps the encoder's own (7x7 at 224)
    feature_dim: int = 0  # D, filled in from the encoder
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # input normalisation, from the encoder
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    attention: str = "additive"
    rnn: str = "lstm"
    embed_dim: int = 256
    attention_dim: int = 256
    decoder_dim: int = 512
    dropout: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """The config a model file holds, checked (``validate``) before anything is built from it."""
        if "vocab_size" not in data:
            raise CapcliError("model config: no vocab_size")
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("mean", "std"):
            value = getattr(cfg, name)
            if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(x) for x in value)):
                raise CapcliError(f"model config: {name} must be a list of 3 numbers, not {shown(value)}")
            setattr(cfg, name, tuple(value))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Known names, and sizes within choices.MODEL_LIMITS: a config never asks for more than capcli can train."""
        for name in ("encoder", "attention", "rnn"):
            if not isinstance(getattr(self, name), str):
                raise CapcliError(f"model config: {name} must be a name, not {shown(getattr(self, name))}")
        check_names(self.encoder, self.attention, self.rnn)
        for name in (*MODEL_LIMITS, "dropout"):
            if problem := model_setting_problem(name, getattr(self, name), name):
                raise CapcliError(f"model config: {problem}")
        if isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, int) or self.feature_dim < 0:
            raise CapcliError(f"model config: feature_dim must be a whole number, not {shown(self.feature_dim)}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# =========================================================================== attention

class AdditiveAttention(nn.Module):
    """Bahdanau: e_i = v^T tanh(W_e f_i + W_d h)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.W_e = nn.Linear(feature_dim, attention_dim)
        self.W_d = nn.Linear(hidden_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)  # a bias would shift every score alike: softmax ignores it

    def keys(self, features):  # (B, L, D) -> (B, L, A), once per image
        return self.W_e(features)

    def scores(self, keys, h):  # (B, L, A), (B, H) -> (B, L)
        return self.v(torch.tanh(keys + self.W_d(h).unsqueeze(1))).squeeze(2)


class GeneralAttention(nn.Module):
    """Luong 'general': e_i = h^T W f_i."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.W = nn.Linear(feature_dim, hidden_dim, bias=False)

    def keys(self, features):  # (B, L, D) -> (B, L, H)
        return self.W(features)

    def scores(self, keys, h):  # (B, L, H), (B, H) -> (B, L)
        return torch.bmm(keys, h.unsqueeze(2)).squeeze(2)


class DotAttention(nn.Module):
    """Scaled dot product after projecting features and state to one size A."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.W_k = nn.Linear(feature_dim, attention_dim)
        self.W_q = nn.Linear(hidden_dim, attention_dim)
        self.scale = attention_dim ** -0.5

    def keys(self, features):  # (B, L, D) -> (B, L, A)
        return self.W_k(features)

    def scores(self, keys, h):  # (B, L, A), (B, H) -> (B, L)
        return torch.bmm(keys, self.W_q(h).unsqueeze(2)).squeeze(2) * self.scale


class NoAttention(nn.Module):
    """Show-and-Tell baseline: every cell weighs the same, so the context is the mean feature."""

    def __init__(self, *_):
        super().__init__()

    def keys(self, features):  # (B, L, D) -> (B, L, 0)
        return features[:, :, :0]

    def scores(self, keys, h):  # -> (B, L), all equal
        return keys.new_zeros(keys.shape[:2])


_ATTENTION = {"additive": AdditiveAttention, "general": GeneralAttention, "dot": DotAttention, "none": NoAttention}


# =========================================================================== decoder

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
        self.attention = _ATTENTION[cfg.attention](D, H, cfg.attention_dim)
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


class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.encoder = Encoder(cfg.encoder, cfg.grid)
        cfg.feature_dim = self.encoder.feature_dim
        cfg.mean, cfg.std = self.encoder.mean, self.encoder.std
        self.cfg = cfg
        self.decoder = Decoder(cfg)

    def grid_shape(self) -> tuple[int, int]:
        """(h, w) of the attention grid, for drawing attention maps."""
        if self.cfg.grid:
            return self.cfg.grid, self.cfg.grid
        with torch.no_grad():
            side = self.encoder(torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size, device=self.device)).size(1)
        h = int(math.isqrt(side))
        return (h, side // h) if h * (side // h) == side else (1, side)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# =========================================================================== loss

def caption_loss(logits: torch.Tensor, alphas: torch.Tensor, padded: torch.Tensor, lengths: list[int],
                 label_smoothing: float = 0.0, attention_reg: float = 0.0, total_words: int | None = None,
                 total_captions: int | None = None, scale: float = 1.0):
    """Teacher-forced loss from ``Decoder.forward``'s outputs: (loss to minimise, summed word NLL
    as a detached tensor, word count).

    The doubly stochastic penalty is lambda * mean_i (1 - sum_t alpha_ti)^2: the paper's sum over
    the L cells, divided by L so that one lambda suits any grid size (with the plain sum, 49-196
    cells make it dwarf the word loss at lambda = 1).

    The means are sums divided by ``total_words`` / ``total_captions`` (default: this batch's own).
    Under DistributedDataParallel each rank holds part of a global batch and DDP averages the
    gradients over the ranks: dividing by the global counts and scaling by the number of ranks
    makes that average the gradient of the global batch's mean loss, as one process would get.
    """
    targets = padded[:, 1:]  # (N, T)
    steps = torch.arange(targets.size(1), device=targets.device)  # (T,)
    mask = steps.unsqueeze(0) < (torch.tensor(lengths, device=targets.device) - 1).unsqueeze(1)  # (N, T)
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (W, V) for the W real words
    nll = -logp.gather(1, targets[mask].unsqueeze(1)).squeeze(1)  # (W,)
    words = nll.numel()
    n_words = total_words or words
    loss = nll.sum() / n_words
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * logp.sum() / (n_words * logp.size(1))
    if attention_reg:
        coverage = alphas.float().sum(dim=1)  # (N, L) attention each cell got over the caption
        n_cells = (total_captions or coverage.size(0)) * coverage.size(1)
        loss = loss + attention_reg * ((1.0 - coverage) ** 2).sum() / n_cells
    return loss * scale, nll.detach().sum(), words
