"""capcli build-vocab."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from capcli.cli.frame import app, handle_errors
from capcli.cli.options import (
    VOCAB,
    CaptionsOpt,
    DataOpt,
    ImagesOpt,
    MinFreqOpt,
    SplitOpt,
    Tokenizer,
    TokenizerOpt,
)
from capcli.errors import CapcliError


@app.command("build-vocab")
@handle_errors
def build_vocab(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the vocabulary JSON.", rich_help_panel=VOCAB)],
    data: DataOpt = None,
    captions: CaptionsOpt = None,
    images: ImagesOpt = None,
    tokenizer: TokenizerOpt = Tokenizer.word,
    min_freq: MinFreqOpt = None,
    max_len: Annotated[Optional[int], typer.Option(help="Longest training caption, in tokens (default: 50 words, 150 characters, 100 SMILES tokens).", min=1, show_default=False, rich_help_panel=VOCAB)] = None,
    split: SplitOpt = None,
):
    """Count the tokens of the train split's captions and write a vocabulary JSON."""
    from capcli.data.datasets import load_dataset
    from capcli.data.splits import parse_split_ratios
    from capcli.text.vocab import SPECIALS, Vocab

    ratios = parse_split_ratios(split) if split else None  # None: 90/5/5, and no note when the data has its own split
    samples = load_dataset(data, captions_file=captions, images_dir=images, split_ratios=ratios).samples
    train = [c for s in samples if s.split == "train" for c in s.captions]
    if not train:
        raise CapcliError(f"{data or captions}: the train split has no captions")
    vocab = Vocab.build(train, min_freq, max_len, tokenizer.value)
    vocab.save(output)
    val = [c for s in samples if s.split == "val" for c in s.captions]
    lengths = sorted(len(vocab.tokenize(c)) for c in train)
    kept = sum(n <= vocab.max_len for n in lengths) / len(lengths)
    print(f"vocabulary: {len(vocab)} {tokenizer.value} tokens ({len(vocab) - len(SPECIALS)} + {len(SPECIALS)} specials), min count {vocab.min_freq}")
    print(f"length in tokens: median {lengths[len(lengths) // 2]}, 95th percentile {lengths[int(0.95 * (len(lengths) - 1))]}, "
          f"longest {lengths[-1]}; --max-len {vocab.max_len} keeps {kept:.1%}")
    print(f"coverage: train {vocab.coverage(train):.2%}" + (f", val {vocab.coverage(val):.2%}" if val else ""))
    print(f"wrote {output}")


