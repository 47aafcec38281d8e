"""How sharply a model attends, and how often greedy captions run on: issue 22's attention figures.

    python bench/bench_attention.py -m MODEL --data DATA [--split test] [--max-len N] [--picture IMAGE -o PNG]

Captions each image of the split greedily (as `capcli caption` does) and prints, over every
generated token: the mean normalised entropy of its attention (1.0 = uniform over the grid, 0 = one
cell), the mean weight of its strongest cell against a uniform cell's, and the share of captions
that stop at the longest output instead of at <end>. With --picture it also draws that image's
attention panels (docs/attention-dog.png).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from capcli.data.datasets import load_dataset
from capcli.data.splits import parse_split_ratios
from capcli.infer import attention_pictures
from capcli.infer.captioner import Captioner
from capcli.infer.decode import DecodeOptions
from capcli.text.tokenizers import DEFAULT_DECODE_LEN


def sharpness(attention: torch.Tensor) -> tuple[float, float]:
    """(T, h, w) attention -> (mean normalised entropy, mean strongest cell / uniform cell)."""
    a = attention.flatten(1).double().clamp_min(1e-12)  # (T, L)
    cells = a.size(1)
    entropy = -(a * a.log()).sum(1) / math.log(cells)  # (T,)
    return float(entropy.mean()), float(a.max(1).values.mean() * cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test", help="train, val, test or all")
    ap.add_argument("--max-len", type=int, default=None, help="default: the tokenizer's, as capcli caption")
    ap.add_argument("--no-repeat-ngram", type=int, default=None, help="default: the tokenizer's, as capcli caption")
    ap.add_argument("--picture", type=Path, help="also draw this image's attention panels")
    ap.add_argument("-o", "--output", type=Path, default=Path("attention.png"))
    args = ap.parse_args()

    captioner = Captioner.load(args.model, "cpu")
    ratios = captioner.training.get("split")
    dataset = load_dataset(args.data, split_ratios=parse_split_ratios(ratios) if ratios else None)
    paths = [s.image for s in dataset.samples if args.split in (s.split, "all")]
    max_len = args.max_len or DEFAULT_DECODE_LEN[captioner.vocab.tokenizer]
    options = DecodeOptions(max_len=max_len, no_repeat_ngram=args.no_repeat_ngram)
    results = [r for r in captioner.caption(paths, options) if r.ok]
    stats = [sharpness(r.attention) for r in results if len(r.tokens)]
    long = sum(len(r.tokens) >= max_len for r in results)
    entropy = sum(e for e, _ in stats) / len(stats)
    peak = sum(p for _, p in stats) / len(stats)
    grid = "x".join(map(str, captioner.grid))
    print(f"{args.model}: {len(results)} {args.split} images, grid {grid}: attention entropy {entropy:.3f} "
          f"(1 = uniform), strongest cell {peak:.1f}x uniform; {long} captions ({100 * long / len(results):.1f}%) "
          f"run to {max_len} tokens")
    if args.picture:
        from capcli.data.images import load_image

        (r,) = captioner.caption([args.picture], options)
        attention_pictures.save(args.output, load_image(args.picture), r.caption, r.tokens, r.attention)
        e, p = sharpness(r.attention)
        print(f"{args.picture}: {r.caption!r}, entropy {e:.3f}, strongest cell {p:.1f}x uniform -> {args.output}")


if __name__ == "__main__":
    main()
