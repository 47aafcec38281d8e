"""The options several commands share, their help panels, and the choice enums (built from the
tuples in capcli.choices and beside the modules that use them)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from capcli import choices
from capcli.data.splits import SPLITS
from capcli.text.tokenizers import TOKENIZERS
from capcli.train.config import SCST_BASELINES


def _choice(name: str, values: tuple[str, ...]) -> type[Enum]:
    """An option's choices as the Enum Typer wants, built from the tuple that states them once."""
    return Enum(name, {value: value for value in values}, type=str)


Format = _choice("Format", choices.FORMATS)
Device = _choice("Device", choices.DEVICES)
Precision = _choice("Precision", choices.PRECISIONS)
CaptionPrecision = _choice("CaptionPrecision", choices.CAPTION_PRECISIONS)
Runtime = _choice("Runtime", choices.RUNTIMES)
ExportFormat = _choice("ExportFormat", choices.EXPORT_FORMATS)
Tokenizer = _choice("Tokenizer", TOKENIZERS)
Attention = _choice("Attention", choices.ATTENTIONS)
Rnn = _choice("Rnn", choices.RNNS)
Baseline = _choice("Baseline", SCST_BASELINES)
SplitName = _choice("SplitName", SPLITS)


# --------------------------------------------------------------------------- build-vocab

# Help panels, so that `--help` reads by topic
DATA, VOCAB, MODEL, RUN, OPTIM = "Data", "Vocabulary", "Model", "Run", "Optimisation"
SCST = "Self-critical training"
INPUT, DECODING, OUTPUT, PERFORMANCE = "Input", "Decoding", "Output", "Performance"
DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder (Flickr8k, Karpathy JSON, COCO; molecules.csv: molecules drawn on the fly).", rich_help_panel=DATA)]
CaptionsOpt = Annotated[Optional[Path], typer.Option("--captions", help="Caption file (CSV, TSV, JSONL) instead of --data; a CSV with a smiles column lists molecules to draw.", rich_help_panel=DATA)]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image folder for --captions (default: its folder).", rich_help_panel=DATA)]
SplitOpt = Annotated[Optional[str], typer.Option("--split-ratios", help="Train/val/test percentages of a hash split (default 90/5/5) for data without its own split.", rich_help_panel=DATA)]


TokenizerOpt = Annotated[Tokenizer, typer.Option(help="word: lowercase words; char: every character; smiles: SMILES atoms (Br, Cl, \\[nH], %10 one token each).", rich_help_panel=VOCAB)]
MinFreqOpt = Annotated[Optional[int], typer.Option(help="Keep tokens seen this often in the train split (default: 5 words; 1 character or SMILES token).", min=1, show_default=False, rich_help_panel=VOCAB)]


# --------------------------------------------------------------------------- caption / beam

PathsArg = Annotated[Optional[List[str]], typer.Argument(help="Image files, folders (searched recursively), URLs, or - for paths on stdin.", show_default=False, rich_help_panel=INPUT)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model file (.safetensors), or a shipped model: default (photo captions) or smiles (molecules). Default: $CAPCLI_MODEL, else the photo model.", show_default=False, rich_help_panel=MODEL)]
DeviceOpt = Annotated[Device, typer.Option(help="Where to run; auto: cuda when available.", rich_help_panel=MODEL)]
PrecisionOpt = Annotated[CaptionPrecision, typer.Option(help="Encoder precision; auto: bf16 on GPUs, int8 on CPUs with VNNI or AMX when the encoder has an int8 version, else fp32.", rich_help_panel=MODEL)]
RuntimeOpt = Annotated[Runtime, typer.Option(help=f"What runs the encoder; auto: OpenVINO on the CPU when installed, except to caption fewer than {choices.OPENVINO_FROM_IMAGES} images; else PyTorch.", rich_help_panel=MODEL)]
MaxLenOpt = Annotated[Optional[int], typer.Option(help="Longest output, in tokens (default: 30 words, 150 characters, 100 SMILES tokens).", min=1, show_default=False, rich_help_panel=DECODING)]
PenaltyOpt = Annotated[float, typer.Option(help="Rank by log-prob / length ** PENALTY.", rich_help_panel=DECODING)]
NoRepeatOpt = Annotated[Optional[int], typer.Option("--no-repeat-ngram", help="Never repeat an N-token sequence in a caption; 0: off. Default: 3 for word models, off for character and SMILES models.", min=0, show_default=False, rich_help_panel=DECODING)]
FormatOpt = Annotated[Optional[Format], typer.Option("--format", "-f", help="text: captions; tsv: path<TAB>caption; jsonl: all details. Default: from -o's extension (.tsv, .jsonl), else text.", show_default=False, rich_help_panel=OUTPUT)]
AttnDirOpt = Annotated[Optional[Path], typer.Option(help="Write an attention picture (PNG) per image here.", rich_help_panel=OUTPUT)]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results to this file instead of stdout, flushed as they come. An existing file is refused unless --resume.", show_default=False, rich_help_panel=OUTPUT)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Keep the results already in -o FILE (tsv/jsonl), skip their images, append the rest.", rich_help_panel=OUTPUT)]
SidecarOpt = Annotated[Optional[str], typer.Option("--sidecar", help="Write each caption to a file beside its image with this extension (photo.jpg -> photo.txt for .txt). Stdout stays empty unless --format is given.", show_default=False, rich_help_panel=OUTPUT)]
SidecarDirOpt = Annotated[Optional[Path], typer.Option("--sidecar-dir", help="Write the sidecars under this folder, mirroring the tree below each input folder (extension: --sidecar, default .txt).", show_default=False, rich_help_panel=OUTPUT)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing sidecars (else their images are skipped unread).", rich_help_panel=OUTPUT)]
ShardOpt = Annotated[Optional[str], typer.Option("--shard", help="I/N: caption only share I (from 0) of N of the sorted inputs, for independent jobs (SLURM arrays, GNU parallel); -o FILE becomes FILE's part I. Under torchrun the shares are automatic.", show_default=False, rich_help_panel=PERFORMANCE)]
BatchOpt = Annotated[int, typer.Option(help="Images per batch.", min=1, rich_help_panel=PERFORMANCE)]
WorkersOpt = Annotated[int, typer.Option(help="Image-decoding threads.", min=1, rich_help_panel=PERFORMANCE)]
MaxPixelsOpt = Annotated[int, typer.Option(help="Refuse images with more pixels (width x height); 0: no limit.", min=0, rich_help_panel=PERFORMANCE)]
