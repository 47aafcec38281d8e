"""Soft attention over the encoder's grid: how much each of the L cells counts at a step.

Shapes: B batch, L grid cells, D feature channels, H decoder size, A attention size.
"""

from __future__ import annotations

import torch
from torch import nn


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


ATTENTION_TYPES = {"additive": AdditiveAttention, "general": GeneralAttention, "dot": DotAttention, "none": NoAttention}
