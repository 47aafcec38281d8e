"""The capcli command line: parse options, call the library, print results, map errors to exit codes.

Results go to stdout and nothing else does; progress bars (only on a terminal), warnings and
errors go to stderr. Exit codes: 0 ok, 1 a run failed (or some images could not be read),
2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import sys
import time
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import List, Optional
from urllib.parse import urlsplit

import typer
from typer.core import TyperGroup
from typing_extensions import Annotated

from capcli.errors import CapcliError
from capcli.data.images import MAX_IMAGE_PIXELS, is_url
from capcli.progress import Reporter
from capcli.train.config import TrainConfig

GLOBAL_FLAGS = ("-q", "--quiet", "--debug")


def _untyped_flags(params: list) -> list:
    """Typer's help shows a `<bool>` type beside every flag; a flag takes no value, so show none."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Group(TyperGroup):
    """capcli's command group: the global flags may come anywhere on the line, flags show no type."""

    def parse_args(self, ctx, args):
        # `capcli caption -q x.jpg` reads as naturally as `capcli -q caption x.jpg`: lift the global
        # flags in front of the command, so no command needs its own copy (up to a `--`).
        end = args.index("--") if "--" in args else len(args)
        lifted = [a for a in args[:end] if a in GLOBAL_FLAGS]
        rest = [a for a in args[:end] if a not in GLOBAL_FLAGS]
        return super().parse_args(ctx, lifted + rest + args[end:])

    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _untyped_flags(command.get_params(ctx))
        return command


app = typer.Typer(
    cls=_Group,
    name="capcli",
    help="Show, Attend and Tell image captioning: build-vocab, train, caption, beam, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("capcli")
_debug = False
_quiet = False


class Format(str, Enum):
    text = "text"
    tsv = "tsv"
    jsonl = "jsonl"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


# --------------------------------------------------------------------------- plumbing

class _StderrFormatter(logging.Formatter):
    def format(self, record):
        prefix = "capcli: warning: " if record.levelno >= logging.WARNING else "capcli: "
        return prefix + record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(_StderrFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class RichReporter(Reporter):
    """A rich progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self):
        self.enabled = sys.stderr.isatty()
        self.progress = None

    def start(self, description, total, unit="items"):
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.stop()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=Console(stderr=True), transient=False,
            redirect_stdout=False,  # results go to stdout as they are made, never into the bar's stderr
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")

    def update(self, advance=1, **fields):
        if self.progress is None:
            return
        info = "  ".join(f"{k.replace('_per_s', '/s').replace('_', ' ')} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in fields.items())
        self.progress.update(self.task, advance=advance, **({"info": info} if fields else {}))

    def stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fail(message: str, code: int) -> None:
    """One line on stderr and exit ``code``; with --debug the traceback first (the code stays the same)."""
    if _debug and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    sys.stderr.write(f"capcli: {message}\n")
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code; --debug adds tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CapcliError as e:
            _fail(e.message, e.exit_code)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt as e:  # Ctrl-C, and SIGTERM/SIGHUP (signals.Stopped)
            from capcli.runtime.signals import exit_code, signal_name, stop_signal

            signum = stop_signal(e)
            _fail(f"interrupted by {signal_name(signum)}", exit_code(signum))
        except Exception as e:  # a bug, or a resource problem we did not foresee
            _fail(_explain(e), 1)

    return wrapper


def _explain(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    if "out of memory" in text.lower():
        return "out of GPU memory: lower --batch-size (or use a smaller --grid / --image-size)"
    if isinstance(e, OSError) and e.errno is not None:  # the disk or the system said no, about a file
        reason = (e.strerror or text or e.__class__.__name__)
        reason = reason[:1].lower() + reason[1:]
        if e.errno == errno.ENOSPC:
            return f"no space left on device{': ' + str(e.filename) if e.filename else ''}"
        return f"{e.filename}: {reason}" if e.filename else reason
    return f"unexpected error: {e.__class__.__name__}: {text} (run with --debug for the traceback)"


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS at every free.

    Every encoder batch on the CPU allocates activations of several MB; with glibc's defaults each
    one is a fresh mmap that the kernel zero-fills page by page (docs/performance-notes.md has the
    figures). It changes the whole process, so the command line sets it, never the library. A no-op where
    the C library has no mallopt (macOS, Windows).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # blocks up to 32 MB (glibc's maximum) come from the heap...
    mallopt(m_trim_threshold, 1 << 30)  # ...which keeps up to 1 GB of freed memory for the next batch


def _quiet_broken_pipe() -> None:
    """The reader went away (`| head -1`): stop quietly, as Unix tools do."""
    _silence_stdout()
    raise typer.Exit(0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so Python's last flush of it cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr. Both flags may also follow the command.")] = False,
):
    global _debug, _quiet
    _debug, _quiet = debug, quiet
    _setup_logging(quiet)
    keep_freed_memory()
    from capcli.runtime.signals import raise_on_stop_signals

    raise_on_stop_signals()  # SIGTERM and SIGHUP unwind like Ctrl-C: files are closed, temporary files removed


# --------------------------------------------------------------------------- build-vocab

# Help panels, so that `--help` reads by topic
DATA, VOCAB, MODEL, RUN, OPTIM = "Data", "Vocabulary", "Model", "Run", "Optimisation"
SCST = "Self-critical training"
INPUT, DECODING, OUTPUT, PERFORMANCE = "Input", "Decoding", "Output", "Performance"
DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder (Flickr8k, Karpathy JSON, COCO).", rich_help_panel=DATA)]
CaptionsOpt = Annotated[Optional[Path], typer.Option("--captions", help="Caption file (CSV, TSV, JSONL) instead of --data.", rich_help_panel=DATA)]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image folder for --captions (default: its folder).", rich_help_panel=DATA)]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Train/val/test percentages of a hash split (default 90/5/5) for data without its own split.", rich_help_panel=DATA)]


class Tokenizer(str, Enum):
    word = "word"
    char = "char"
    smiles = "smiles"


TokenizerOpt = Annotated[Tokenizer, typer.Option(help="word: lowercase words; char: every character; smiles: SMILES atoms (Br, Cl, [nH], %10 one token each).", rich_help_panel=VOCAB)]
MinFreqOpt = Annotated[Optional[int], typer.Option(help="Keep tokens seen this often in the train split (default: 5 words; 1 character or SMILES token).", min=1, show_default=False, rich_help_panel=VOCAB)]


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
    from capcli.data.datasets import load_dataset, parse_split_ratios
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


# --------------------------------------------------------------------------- train

class Attention(str, Enum):
    additive = "additive"
    general = "general"
    dot = "dot"
    none = "none"


class Rnn(str, Enum):
    lstm = "lstm"
    gru = "gru"


class Baseline(str, Enum):
    mean = "mean"
    greedy = "greedy"


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
    split: Annotated[Optional[str], typer.Option("--split", help="Train/val/test percentages of a hash split (default 90/5/5) for data without its own split.", rich_help_panel=DATA)] = None,
    vocab: Annotated[Optional[Path], typer.Option("--vocab", help="Vocabulary JSON from build-vocab (default: built here).", rich_help_panel=DATA)] = None,
    tokenizer: Annotated[Tokenizer, typer.Option(help="word, char or smiles (a --vocab file's must match).", rich_help_panel=DATA)] = Tokenizer(_DEFAULT.tokenizer),
    min_freq: Annotated[Optional[int], typer.Option(help="Vocabulary built here: keep tokens seen this often (default: 5 words; 1 character or SMILES token).", min=1, show_default=False, rich_help_panel=DATA)] = _DEFAULT.min_freq,
    max_len: Annotated[Optional[int], typer.Option(help="Leave out longer training captions, in tokens (default: the vocabulary's: 50 words, 150 characters, 100 SMILES tokens).", min=1, rich_help_panel=DATA, show_default=False)] = None,
    max_bad_fraction: Annotated[float, typer.Option(help="Stop if more of the images than this fraction cannot be read.", min=0.0, max=1.0, rich_help_panel=DATA)] = _DEFAULT.max_bad_fraction,
    encoder: Annotated[str, typer.Option(help="lite0 (offline), resnet50/101/152, or timm:NAME.", callback=_check_encoder, rich_help_panel=MODEL)] = _DEFAULT.encoder,
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
    fine_tune_encoder: Annotated[bool, typer.Option("--fine-tune-encoder", help="Train the encoder's top blocks too (no feature cache).", rich_help_panel=OPTIM)] = _DEFAULT.fine_tune_encoder,
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
    from capcli.train import loop as training

    settings = {k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v
                for k, v in ctx.params.items() if k in _TRAIN_FIELDS}
    reporter = RichReporter()
    if resume is not None:
        given = _given_options(ctx)
        if "output" in given:
            raise CapcliError("give either -o RUN_DIR (a new run) or --resume RUN_DIR, not both")
        summary = _run_training(lambda: training.resume(resume, {k: settings[k] for k in given if k in settings}, reporter))
        run_dir = resume
    else:
        if output is None:
            raise CapcliError("give the run folder: -o RUN_DIR (or --resume RUN_DIR)")
        if (output / "last.safetensors").exists():
            raise CapcliError(f"{output}: already holds a run; continue it with --resume {output}, or choose another -o")
        cfg = TrainConfig(**settings)
        cfg.validate()  # before any data is read or file written
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


def _given_options(ctx: typer.Context) -> set[str]:
    """The options of the running command that were given on the command line (not defaults)."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items() if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}


def _run_training(fn):
    from capcli.train.loop import TrainingInterrupted

    try:
        return fn()
    except TrainingInterrupted as e:
        _fail(str(e), e.exit_code)


# --------------------------------------------------------------------------- caption / beam

PathsArg = Annotated[Optional[List[str]], typer.Argument(help="Image files, folders (searched recursively), URLs, or - for paths on stdin.", show_default=False, rich_help_panel=INPUT)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model file (.safetensors), or a shipped model: default (photo captions) or smiles (molecules).", show_default=False, rich_help_panel=MODEL)]
DeviceOpt = Annotated[Device, typer.Option(help="Where to run; auto: cuda when available.", rich_help_panel=MODEL)]
PrecisionOpt = Annotated[Precision, typer.Option(help="Encoder precision; auto: bf16 on GPUs and AMX CPUs, else fp32.", rich_help_panel=MODEL)]
MaxLenOpt = Annotated[Optional[int], typer.Option(help="Longest output, in tokens (default: 30 words, 150 characters, 100 SMILES tokens).", min=1, show_default=False, rich_help_panel=DECODING)]
PenaltyOpt = Annotated[float, typer.Option(help="Rank by log-prob / length ** PENALTY.", rich_help_panel=DECODING)]
FormatOpt = Annotated[Optional[Format], typer.Option("--format", "-f", help="text: captions; tsv: path<TAB>caption; jsonl: all details. Default: from -o's extension (.tsv, .jsonl), else text.", show_default=False, rich_help_panel=OUTPUT)]
AttnDirOpt = Annotated[Optional[Path], typer.Option(help="Write an attention picture (PNG) per image here.", rich_help_panel=OUTPUT)]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results to this file instead of stdout, flushed as they come. An existing file is refused unless --resume.", show_default=False, rich_help_panel=OUTPUT)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Keep the results already in -o FILE (tsv/jsonl), skip their images, append the rest.", rich_help_panel=OUTPUT)]
SidecarOpt = Annotated[Optional[str], typer.Option("--sidecar", help="Write each caption to a file beside its image with this extension (photo.jpg -> photo.txt for .txt). Stdout stays empty unless --format is given.", show_default=False, rich_help_panel=OUTPUT)]
SidecarDirOpt = Annotated[Optional[Path], typer.Option("--sidecar-dir", help="Write the sidecars under this folder, mirroring the tree below each input folder (extension: --sidecar, default .txt).", show_default=False, rich_help_panel=OUTPUT)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing sidecars (else their images are skipped unread).", rich_help_panel=OUTPUT)]
ShardOpt = Annotated[Optional[str], typer.Option("--shard", help="I/N: caption only share I (from 0) of N of the sorted inputs, for independent jobs (SLURM arrays, GNU parallel); -o FILE becomes FILE's part I. Under torchrun the shares are automatic.", show_default=False, rich_help_panel=INPUT)]
BatchOpt = Annotated[int, typer.Option(help="Images per batch.", min=1, rich_help_panel=PERFORMANCE)]
WorkersOpt = Annotated[int, typer.Option(help="Image-decoding threads.", min=1, rich_help_panel=PERFORMANCE)]
MaxPixelsOpt = Annotated[int, typer.Option(help="Refuse images with more pixels (width x height); 0: no limit.", min=0, rich_help_panel=PERFORMANCE)]


@dataclasses.dataclass
class CollectionOptions:
    """Where caption/beam results go and which images a process takes (see capcli.infer.collection)."""

    fmt: Optional[Format] = None  # None: from -o's extension, else text
    output: Optional[Path] = None
    resume: bool = False
    sidecar: Optional[str] = None
    sidecar_dir: Optional[Path] = None
    overwrite: bool = False
    shard: Optional[str] = None


def _caption_command(paths, model, device, precision, batch_size, options, attention_dir, workers, max_pixels,
                     out: CollectionOptions):
    from capcli.infer import collection
    from capcli.runtime import distributed
    from capcli.infer.captioner import Captioner
    from capcli.data.images import expand_paths

    fmt = collection.output_format(out.fmt.value if out.fmt else None, out.output)
    if out.resume and out.output is None:
        raise CapcliError("--resume continues an -o FILE: give the file")
    if out.resume and fmt == "text":
        raise CapcliError(collection.TEXT_CANNOT_RESUME)
    if out.sidecar_dir is not None and out.sidecar is None:
        out.sidecar = ".txt"
    if not paths:
        if sys.stdin.isatty():
            raise CapcliError("give image paths, folders, or - to read paths from stdin (see --help)")
        paths = ["-"]
    ctx = distributed.setup()  # torchrun: one share per process; alone: no-op
    if ctx.enabled and out.shard is not None:
        raise CapcliError("--shard is for independent jobs; under torchrun each process takes its share already")
    index, count = collection.parse_shard(out.shard) if out.shard else (ctx.rank, ctx.world_size)
    if ctx.enabled and "-" in paths:
        raise CapcliError("under torchrun give folders or files: the processes cannot share stdin "
                          "(or split a list with --shard I/N, one job per share)")
    if ctx.enabled and out.output is None and out.sidecar is None:
        raise CapcliError("under torchrun give -o FILE (each process writes a part, merged in order at the end) "
                          "or --sidecar: the processes cannot share stdout")
    if ctx.enabled and out.output is not None and out.output.exists() and not out.resume:
        raise CapcliError(f"{out.output} already exists: add --resume to skip the images in it and append the rest, "
                          f"or choose another -o")
    to_stdout = out.output is None and (out.sidecar is None or out.fmt is not None)

    # What can fail in one process alone (its part file exists or another run has it, a folder it
    # cannot write) is found before the first collective, and every process stops on it together:
    # none is left waiting for one that has gone.
    destination, problem = None, None
    try:
        try:
            sidecars = None if out.sidecar is None else collection.Sidecars(
                out.sidecar, out.sidecar_dir, [p for p in paths if os.path.isdir(p)], out.overwrite)
            if attention_dir is not None:
                collection.writable_folder(attention_dir, "--attention-dir")
            # A folder is listed first (its total drives the progress bar, and shares need it); stdin streams.
            listed = count > 1 or "-" not in paths
            items = list(expand_paths(paths)) if listed else expand_paths(paths)
            found = len(items) if listed else None
            if listed:
                items = collection.share(items, index, count, batch_size)
            also_done = collection.read_done(out.output, fmt) if ctx.enabled and out.resume and out.output.exists() else None
            destination = collection.Destination(fmt, out.output, out.resume, sidecars, index, count, also_done)
            captioner = Captioner.load(model, str(distributed.training_device(ctx, device.value)), precision.value)
        except CapcliError as e:
            problem = e
        _stop_together(ctx, problem)
    except BaseException:
        if destination is not None:
            destination.close(failed=True)  # a result file this run made, still empty, goes again
        raise

    todo = destination.todo(items)
    reporter = RichReporter() if ctx.is_main and not _quiet else Reporter()
    reporter.start("captioning", len(items) if listed else None, "images")
    counts, shown = destination.counts, 0
    names_used: set[str] = set()
    tick = time.perf_counter()
    failed = True
    try:
        for r in captioner.caption_stream(todo, options, batch_size, workers, max_pixels=max_pixels):
            line = destination.put(r)
            if not r.ok:
                sys.stderr.write(f"capcli: {collection.printable(r.path)}: {collection.printable(r.error)}\n")
            if line is not None and to_stdout:
                sys.stdout.buffer.write(collection.line_bytes(line))  # bytes: a name that is not UTF-8 as it is
                sys.stdout.buffer.flush()  # a pipe is block-buffered: without this `| head -1` waits for ~170 lines
            if attention_dir is not None and r.ok:
                _write_attention(attention_dir, r, names_used, max_pixels)
            reporter.update(advance=counts.captioned + counts.skipped - shown, failed=counts.failed,
                            images_per_s=counts.captioned / max(time.perf_counter() - tick, 1e-9))
            shown = counts.captioned + counts.skipped
        failed = False
    finally:
        reporter.update(advance=counts.captioned + counts.skipped - shown)
        reporter.stop()
        destination.close(failed)
    try:
        counts = sum(distributed.all_gather_object(ctx, counts), collection.Counts())  # every process's
    except Exception as e:
        if not distributed.is_failure(e):
            raise
        raise CapcliError(distributed.failure_message(ctx, e, None, task="captioning") +
                          "; run the same command with --resume to continue", exit_code=1) from None
    if ctx.enabled and out.output is not None and ctx.is_main:
        parts = [collection.part_path(out.output, r, count) for r in range(count)]
        lines = collection.merge_parts(out.output, parts, fmt)
        log.info("merged the results of %d processes into %s (%d lines)", count, out.output, lines)
    if out.sidecar is not None:
        log.info("sidecars: %d written, %d skipped (already there), %d failed", counts.written, counts.skipped, counts.failed)
    elif out.resume and counts.skipped:
        log.info("%d images were already done (in %s); %d captioned now", counts.skipped, out.output, counts.captioned)
    if found == 0 or (found is None and counts.captioned + counts.skipped == 0):
        raise CapcliError("no images found in " + " ".join(paths), exit_code=1)
    if counts.failed:
        log.warning("%d of %d images could not be read%s", counts.failed, counts.captioned,
                    " or their sidecars written" * (out.sidecar is not None))
        raise typer.Exit(1)


def _stop_together(ctx, problem: CapcliError | None) -> None:
    """Raise ``problem``, or under torchrun the first problem any process had, in every process."""
    from capcli.runtime import distributed

    if not ctx.enabled:
        if problem is not None:
            raise problem
        return
    try:
        problems = distributed.all_gather_object(ctx, None if problem is None else (problem.message, problem.exit_code))
    except Exception as e:
        if not distributed.is_failure(e):
            raise
        raise CapcliError(distributed.failure_message(ctx, e, None, task="captioning"), exit_code=1) from None
    for rank, theirs in enumerate(problems):
        if theirs is not None:
            message, code = theirs
            raise CapcliError(f"process {rank} of {ctx.world_size}: {message}", code)


def _picture_name(path: str, used: set[str]) -> str:
    """The image's stem, or stem-2, stem-3... : never a name this run already used (a/dog.jpg,
    b/dog.jpg and c/dog-2.jpg give dog, dog-2 and dog-2-2)."""
    stem = PurePosixPath(urlsplit(path).path).stem if is_url(path) else Path(path).stem
    stem = stem or "image"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


def _write_attention(directory: Path, r, names_used: set[str], max_pixels: int) -> None:
    from capcli.infer import attention_pictures as attention_map
    from capcli.infer.collection import printable
    from capcli.data.images import ImageError, load_image

    name = _picture_name(r.path, names_used)
    try:
        image = load_image(r.path, draft_size=attention_map.PANEL, max_pixels=max_pixels)  # no bigger than drawn
        attention_map.save(directory / f"{name}.png", image, r.caption, r.tokens, r.attention)
    except ImageError as e:  # changed since it was captioned
        log.warning("%s: %s (no attention picture)", printable(r.path), e)
    except OSError as e:  # the folder went read-only or full since the run started
        if e.errno == errno.ENOSPC:
            raise
        log.warning("%s: cannot write its attention picture (%s)", printable(r.path), e.strerror or e)


@app.command()
@handle_errors
def caption(
    paths: PathsArg = None,
    model: ModelOpt = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.auto,
    max_len: MaxLenOpt = None,
    length_penalty: PenaltyOpt = 1.0,
    format: FormatOpt = None,
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    sidecar: SidecarOpt = None,
    sidecar_dir: SidecarDirOpt = None,
    overwrite: OverwriteOpt = False,
    attention_dir: AttnDirOpt = None,
    shard: ShardOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
    max_image_pixels: MaxPixelsOpt = MAX_IMAGE_PIXELS,
):
    """Caption images with greedy decoding (fast). Examples: capcli caption photos/ --format tsv;
    capcli caption photos/ --sidecar .txt (photo.jpg -> photo.txt); capcli caption photos/ -o out.jsonl --resume"""
    from capcli.infer.decode import DecodeOptions

    options = DecodeOptions(beam_size=1, max_len=max_len, length_penalty=length_penalty)
    out = CollectionOptions(format, output, resume, sidecar, sidecar_dir, overwrite, shard)
    _caption_command(paths, model, device, precision, batch_size, options, attention_dir, workers, max_image_pixels, out)


@app.command()
@handle_errors
def beam(
    paths: PathsArg = None,
    model: ModelOpt = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.auto,
    beam_size: Annotated[int, typer.Option("--beam-size", "-k", help="Beams per image.", min=1, rich_help_panel=DECODING)] = 3,
    nbest: Annotated[int, typer.Option(help="Captions per image to report (jsonl 'alternatives').", min=1, rich_help_panel=DECODING)] = 1,
    max_len: MaxLenOpt = None,
    length_penalty: PenaltyOpt = 1.0,
    format: FormatOpt = None,
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    sidecar: SidecarOpt = None,
    sidecar_dir: SidecarDirOpt = None,
    overwrite: OverwriteOpt = False,
    attention_dir: AttnDirOpt = None,
    shard: ShardOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
    max_image_pixels: MaxPixelsOpt = MAX_IMAGE_PIXELS,
):
    """Caption images with beam search, many images decoded together. Examples: capcli beam -k 5 photo.jpg;
    torchrun --nproc-per-node 8 -m capcli beam photos/ -o out.jsonl (one share per GPU, merged in order)"""
    if nbest > beam_size:
        raise CapcliError(f"--nbest {nbest} is larger than --beam-size {beam_size}")
    from capcli.infer.decode import DecodeOptions

    options = DecodeOptions(beam_size=beam_size, nbest=nbest, max_len=max_len, length_penalty=length_penalty)
    out = CollectionOptions(format, output, resume, sidecar, sidecar_dir, overwrite, shard)
    _caption_command(paths, model, device, precision, batch_size, options, attention_dir, workers, max_image_pixels, out)


class SplitName(str, Enum):
    test = "test"
    val = "val"
    train = "train"


@app.command()
@handle_errors
def evaluate(
    data: DataOpt = None,
    captions: CaptionsOpt = None,
    images: ImagesOpt = None,
    split_name: Annotated[SplitName, typer.Option("--split", help="The split to caption and score.", rich_help_panel=DATA)] = SplitName.test,
    split_ratios: Annotated[Optional[str], typer.Option("--split-ratios", help="Train/val/test percentages (default: the model's).", rich_help_panel=DATA)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N images of the split.", min=1, rich_help_panel=DATA)] = None,
    model: ModelOpt = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.auto,
    beam_size: Annotated[int, typer.Option("--beam-size", "-k", help="1: greedy; more: beam search.", min=1, rich_help_panel=DECODING)] = 1,
    max_len: MaxLenOpt = None,
    length_penalty: PenaltyOpt = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as one JSON object.", rich_help_panel=OUTPUT)] = False,
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the captions here (JSONL, with references).", rich_help_panel=OUTPUT)] = None,
    batch_size: BatchOpt = 32,
    max_image_pixels: MaxPixelsOpt = MAX_IMAGE_PIXELS,
):
    """Caption a split of a dataset and score it: BLEU-1..4, METEOR (with Java), ROUGE-L, CIDEr for word
    models; exact match and edit similarity for char and SMILES models, plus validity, canonical
    match and Tanimoto for SMILES when RDKit is installed."""
    from capcli.infer.captioner import Captioner, model_path
    from capcli.data.datasets import load_dataset, parse_split_ratios, split_mismatch
    from capcli.infer.evaluate import evaluate_model
    from capcli.infer.decode import DecodeOptions

    split_name = split_name.value
    captioner = Captioner.load(model, device.value, precision.value)
    # The hash split must be the one the model was trained with, or test images may have been trained on.
    ratios = split_ratios or captioner.training.get("split")
    ratios = parse_split_ratios(ratios) if ratios else None
    dataset = load_dataset(data, captions_file=captions, images_dir=images, split_ratios=ratios)
    if (trained_from := split_mismatch(captioner.training, dataset, ratios)) is not None:
        log.warning("%s: trained on a split from %s; this evaluation's %s split comes from %s: its images may have "
                    "been in training, scores may be inflated", model_path(model), trained_from,
                    split_name, dataset.split_source)
    chosen = [s for s in dataset.samples if s.split == split_name][:limit]
    if not chosen:
        raise CapcliError(f"{data or captions}: the {split_name} split is empty (split from {dataset.split_source})")
    reporter = RichReporter()
    reporter.start(f"captioning {split_name}", len(chosen), unit="images")
    try:
        options = DecodeOptions(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
        scores, notes, results = evaluate_model(captioner, chosen, options, batch_size, max_pixels=max_image_pixels,
                                                on_result=lambda r: reporter.update(1))
    except ValueError as e:
        raise CapcliError(str(e), exit_code=1) from None
    finally:
        reporter.stop()
    for note in notes:
        log.warning("%s", note)
    if save is not None:
        refs = {str(s.image_path): list(s.captions) for s in chosen}
        lines = [json.dumps({"path": r.path, "caption": r.caption, "references": refs[r.path]} if r.ok
                            else {"path": r.path, "error": r.error}, ensure_ascii=False) for r in results]
        from capcli.files import atomic_write_bytes

        atomic_write_bytes(save, ("\n".join(lines) + "\n").encode())
    summary = {"split": split_name, "images": len(chosen), "beam_size": beam_size, **scores}
    if as_json:
        print(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(chosen)} {split_name} images, " + ("greedy" if beam_size == 1 else f"beam {beam_size}"))
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in scores.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)


def main() -> None:
    try:
        app()  # standalone mode: always ends in SystemExit
        code = 0
    except SystemExit as e:
        code = e.code
    except BrokenPipeError:  # the reader went away while Python flushed stdout on the way out
        _silence_stdout()
        code = 0
    dist = sys.modules.get("capcli.runtime.distributed")  # imported only by training
    if dist is not None and dist.joined_a_group():
        dist.exit_process(code if isinstance(code, int) else 1)  # see there: torchrun workers skip shutdown
    sys.exit(code)


if __name__ == "__main__":
    main()
