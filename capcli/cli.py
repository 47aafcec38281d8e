"""The capcli command line: parse options, call the library, print results, map errors to exit codes.

Results go to stdout and nothing else does; progress bars (only on a terminal), warnings and
errors go to stderr. Exit codes: 0 ok, 1 a run failed (or some images could not be read),
2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from capcli.errors import CapcliError
from capcli.progress import Reporter

app = typer.Typer(
    name="capcli",
    help="Show, Attend and Tell image captioning: build-vocab, train, caption, beam, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("capcli")
_debug = False


class Format(str, Enum):
    text = "text"
    tsv = "tsv"
    jsonl = "jsonl"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
    sys.stderr.write(f"capcli: {message}\n")
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code; --debug shows tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CapcliError as e:
            if _debug:
                raise
            _fail(e.message, e.exit_code)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:
            if _debug:
                raise
            _fail("interrupted", 130)
        except Exception as e:  # a bug, or a resource problem we did not foresee
            if _debug:
                raise
            _fail(_explain(e), 1)

    return wrapper


def _explain(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    if "out of memory" in text.lower():
        return "out of GPU memory: lower --batch-size (or use a smaller --grid / --image-size)"
    if isinstance(e, OSError) and e.errno == 28:
        return f"no space left on device{': ' + e.filename if e.filename else ''}"
    return f"unexpected error: {e.__class__.__name__}: {text} (run with --debug for the traceback)"


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS at every free.

    Every encoder batch on the CPU allocates activations of several MB; with glibc's defaults each
    one is a fresh mmap that the kernel zero-fills page by page: captioning 1200 images took 5
    million page faults and a quarter of the CPU time in the kernel (Captioner.caption_stream,
    beam 1 and 3 over flickr8k-mini; 57 thousand faults with this).
    It changes the whole process, so the command line sets it, never the library. A no-op where
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
):
    global _debug
    _debug = debug
    _setup_logging(quiet)
    keep_freed_memory()


# --------------------------------------------------------------------------- build-vocab

DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help="Dataset folder (Kaggle/original Flickr8k, Karpathy JSON, COCO).")]
CaptionsOpt = Annotated[Optional[Path], typer.Option("--captions", help="Caption file (CSV, TSV or JSONL with image and caption columns), instead of --data.")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image folder for --captions (default: the caption file's folder).")]
SplitOpt = Annotated[str, typer.Option("--split", help="Train/val/test percentages for datasets without their own split, by image-name hash.")]


@app.command("build-vocab")
@handle_errors
def build_vocab(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the vocabulary JSON.")],
    data: DataOpt = None,
    captions: CaptionsOpt = None,
    images: ImagesOpt = None,
    min_freq: Annotated[int, typer.Option(help="Keep words seen at least this often in the train split.", min=1)] = 5,
    max_len: Annotated[int, typer.Option(help="Longest training caption, in words.", min=1)] = 50,
    split: SplitOpt = "90/5/5",
):
    """Count the words of the train split's captions and write a vocabulary JSON."""
    from capcli.datasets import load_dataset, parse_split_ratios
    from capcli.vocab import SPECIALS, Vocab

    samples = load_dataset(data, captions_file=captions, images_dir=images, split_ratios=parse_split_ratios(split))
    train = [c for s in samples if s.split == "train" for c in s.captions]
    if not train:
        raise CapcliError(f"{data or captions}: the train split has no captions")
    vocab = Vocab.build(train, min_freq, max_len)
    vocab.save(output)
    val = [c for s in samples if s.split == "val" for c in s.captions]
    print(f"vocabulary: {len(vocab)} words ({len(vocab) - len(SPECIALS)} + {len(SPECIALS)} specials), min count {min_freq}")
    print(f"coverage: train {vocab.coverage(train):.2%}" + (f", val {vocab.coverage(val):.2%}" if val else ""))
    print(f"wrote {output}")


# --------------------------------------------------------------------------- train

@app.command()
@handle_errors
def train(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder: checkpoints, metrics.jsonl, feature cache.")] = None,
    data: DataOpt = None,
    captions: CaptionsOpt = None,
    images: ImagesOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder exactly where it stopped.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs to train (default 20).", min=1)] = None,
    batch_size: Annotated[int, typer.Option(help="Captions per batch (under torchrun: the global batch, split across the processes).", min=1)] = 64,
    lr: Annotated[float, typer.Option(help="Decoder learning rate (AdamW).")] = 4e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (0 = Adam).")] = 0.0,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Random seed (batches, dropout, initial weights).")] = 0,
    vocab: Annotated[Optional[Path], typer.Option("--vocab", help="Vocabulary JSON from build-vocab (default: built from the train split).")] = None,
    min_freq: Annotated[int, typer.Option(help="Vocabulary: minimum word count, when --vocab is not given.", min=1)] = 5,
    max_len: Annotated[int, typer.Option(help="Leave out training captions longer than this many words.", min=1)] = 50,
    split: SplitOpt = "90/5/5",
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better val BLEU-4 (default 5).", min=1)] = None,
    lr_patience: Annotated[int, typer.Option(help="Halve the learning rate after this many epochs without gain.", min=0)] = 2,
    encoder: Annotated[str, typer.Option(help="lite0 (offline default), resnet50, resnet101, resnet152, or timm:NAME.")] = "lite0",
    encoder_weights: Annotated[Optional[Path], typer.Option(help="ImageNet weights for the encoder (.safetensors or .pth), instead of downloading.")] = None,
    image_size: Annotated[int, typer.Option(help="Images are resized to this square size.", min=32)] = 224,
    grid: Annotated[int, typer.Option(help="Pool the feature map to GRID x GRID (0: the encoder's own, 7x7 at 224).", min=0)] = 0,
    attention: Annotated[str, typer.Option(help="additive (Bahdanau), general, dot, or none (Show and Tell).")] = "additive",
    rnn: Annotated[str, typer.Option(help="lstm or gru.")] = "lstm",
    embed_dim: Annotated[int, typer.Option(min=1)] = 256,
    attention_dim: Annotated[int, typer.Option(min=1)] = 256,
    decoder_dim: Annotated[int, typer.Option(min=1)] = 512,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.5,
    attention_reg: Annotated[float, typer.Option(help="Lambda of the doubly stochastic attention penalty.")] = 1.0,
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.0,
    grad_clip: Annotated[float, typer.Option(help="Clip gradients to this norm (0: off).")] = 5.0,
    fine_tune_encoder: Annotated[bool, typer.Option(help="Unfreeze the encoder's top blocks (no feature cache).")] = False,
    encoder_lr: Annotated[float, typer.Option(help="Learning rate of the unfrozen encoder blocks.")] = 1e-4,
    workers: Annotated[int, typer.Option(help="Image-loading threads.", min=1)] = 2,
    max_bad_fraction: Annotated[float, typer.Option(help="Stop if more than this fraction of the images cannot be read.")] = 0.01,
    save_every: Annotated[float, typer.Option("--save-every", help="Also save last.safetensors every N minutes within an epoch (0: off).")] = 10.0,
):
    """Train a captioner on a dataset folder; writes best.safetensors and last.safetensors to the run folder."""
    from capcli import train as training

    reporter = RichReporter()
    if resume is not None:
        overrides = {"epochs": epochs, "patience": patience, "device": device.value if device != Device.auto else None,
                     "workers": workers, "save_every_minutes": save_every, "max_bad_fraction": max_bad_fraction}
        summary = _run_training(lambda: training.resume(resume, overrides, reporter))
        run_dir = resume
    else:
        if output is None:
            raise CapcliError("give the run folder: -o RUN_DIR (or --resume RUN_DIR)")
        if data is None and captions is None:
            raise CapcliError("give the data: --data DIR, or --captions FILE --images DIR")
        if (output / "last.safetensors").exists():
            raise CapcliError(f"{output}: already holds a run; continue it with --resume {output}, or choose another -o")
        cfg = training.TrainConfig(
            out=str(output), data=str(data) if data else None, captions=str(captions) if captions else None,
            images=str(images) if images else None, split=split, vocab=str(vocab) if vocab else None,
            min_freq=min_freq, max_len=max_len, max_bad_fraction=max_bad_fraction, encoder=encoder,
            encoder_weights=str(encoder_weights) if encoder_weights else None, image_size=image_size, grid=grid,
            attention=attention, rnn=rnn, embed_dim=embed_dim, attention_dim=attention_dim, decoder_dim=decoder_dim,
            dropout=dropout, epochs=epochs or 20, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            grad_clip=grad_clip, attention_reg=attention_reg, label_smoothing=label_smoothing,
            fine_tune_encoder=fine_tune_encoder, encoder_lr=encoder_lr, patience=patience or 5, lr_patience=lr_patience,
            device=device.value, seed=seed, workers=workers, save_every_minutes=save_every,
        )
        summary = _run_training(lambda: training.train(cfg, reporter))
        run_dir = output
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return  # under torchrun only rank 0 prints the result
    best = run_dir / "best.safetensors"
    bleu = summary.get("val_bleu4")
    print(f"{best}" + (f"\tval BLEU-4 {bleu:.4f} (epoch {summary.get('best_epoch')})" if bleu is not None else ""))


def _run_training(fn):
    from capcli.train import TrainingInterrupted

    try:
        return fn()
    except TrainingInterrupted as e:
        _fail(str(e), 130)


# --------------------------------------------------------------------------- caption / beam

ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="Model file (.safetensors); default: the shipped model.")]
PathsArg = Annotated[Optional[List[str]], typer.Argument(help="Image files, folders (searched recursively), or - for paths on stdin.", show_default=False)]


def _caption_command(paths, model, device, batch_size, fmt, options, attention_dir, workers):
    from capcli.api import Captioner
    from capcli.images import expand_paths

    if not paths:
        if sys.stdin.isatty():
            raise CapcliError("give image paths, folders, or - to read paths from stdin (see --help)")
        paths = ["-"]
    captioner = Captioner.load(model, device.value)
    if attention_dir is not None:
        attention_dir.mkdir(parents=True, exist_ok=True)
    failed = total = 0
    names_used: dict[str, int] = {}
    results = captioner.caption_stream(expand_paths(paths), options, batch_size, workers)
    for r in results:
        total += 1
        if not r.ok:
            failed += 1
            sys.stderr.write(f"capcli: {r.path}: {r.error}\n")
        _print_result(r, fmt)
        if attention_dir is not None and r.ok:
            _write_attention(attention_dir, r, names_used)
    sys.stdout.flush()
    if total == 0:
        raise CapcliError("no images found in " + " ".join(paths), exit_code=1)
    if failed:
        log.warning("%d of %d images could not be read", failed, total)
        raise typer.Exit(1)


def _print_result(r, fmt: Format) -> None:
    if fmt == Format.text:
        line = r.caption if r.ok else ""  # an empty line keeps the output aligned with the input
    elif fmt == Format.tsv:
        if not r.ok:
            return
        line = f"{r.path}\t{r.caption}"
    elif not r.ok:
        line = json.dumps({"path": r.path, "error": r.error}, ensure_ascii=False)
    else:
        obj = {"path": r.path, "caption": r.caption, "tokens": r.tokens, "score": _num(r.score), "logprob": _num(r.logprob)}
        if r.alternatives:
            obj["alternatives"] = [{"caption": a.caption, "tokens": a.tokens, "score": _num(a.score), "logprob": _num(a.logprob)}
                                   for a in r.alternatives]
        line = json.dumps(obj, ensure_ascii=False)
    sys.stdout.write(line + "\n")
    if not sys.stdout.isatty():
        return
    sys.stdout.flush()


def _num(x: float):
    return round(x, 5) if math.isfinite(x) else None


def _write_attention(directory: Path, r, names_used: dict[str, int]) -> None:
    from capcli import attention_map
    from capcli.images import ImageError, load_image

    stem = Path(r.path).stem or "image"
    names_used[stem] = names_used.get(stem, 0) + 1
    name = stem if names_used[stem] == 1 else f"{stem}-{names_used[stem]}"
    try:
        image = load_image(r.path)
    except ImageError as e:  # changed since it was captioned
        log.warning("%s: %s (no attention picture)", r.path, e)
        return
    attention_map.save(directory / f"{name}.png", image, r.tokens, r.attention)


FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="text: one caption per line; tsv: path<TAB>caption; jsonl: one JSON object per image.")]
DeviceOpt = Annotated[Device, typer.Option(help="cpu, cuda, or auto (cuda when available).")]
BatchOpt = Annotated[int, typer.Option(help="Images per batch.", min=1)]
MaxLenOpt = Annotated[int, typer.Option(help="Longest caption, in words.", min=1)]
PenaltyOpt = Annotated[float, typer.Option(help="Length normalisation: score = log-prob / length ** PENALTY.")]
AttnDirOpt = Annotated[Optional[Path], typer.Option(help="Write one attention picture (PNG) per image into this folder.")]
WorkersOpt = Annotated[int, typer.Option(help="Image-decoding threads.", min=1)]


@app.command()
@handle_errors
def caption(
    paths: PathsArg = None,
    model: ModelOpt = None,
    format: FormatOpt = Format.text,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = 32,
    max_len: MaxLenOpt = 30,
    length_penalty: PenaltyOpt = 1.0,
    attention_dir: AttnDirOpt = None,
    workers: WorkersOpt = 2,
):
    """Caption images with greedy decoding (fast). Example: capcli caption photos/ --format tsv"""
    from capcli.sampling import DecodeOptions

    options = DecodeOptions(beam_size=1, max_len=max_len, length_penalty=length_penalty)
    _caption_command(paths, model, device, batch_size, format, options, attention_dir, workers)


@app.command()
@handle_errors
def beam(
    paths: PathsArg = None,
    beam_size: Annotated[int, typer.Option("--beam-size", "-k", help="Beams per image.", min=1)] = 3,
    nbest: Annotated[int, typer.Option(help="Hypotheses per image to report (jsonl 'alternatives').", min=1)] = 1,
    model: ModelOpt = None,
    format: FormatOpt = Format.text,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = 32,
    max_len: MaxLenOpt = 30,
    length_penalty: PenaltyOpt = 1.0,
    attention_dir: AttnDirOpt = None,
    workers: WorkersOpt = 2,
):
    """Caption images with beam search, many images decoded together. Example: capcli beam -k 5 photo.jpg"""
    if nbest > beam_size:
        raise CapcliError(f"--nbest {nbest} is larger than --beam-size {beam_size}")
    from capcli.sampling import DecodeOptions

    options = DecodeOptions(beam_size=beam_size, nbest=nbest, max_len=max_len, length_penalty=length_penalty)
    _caption_command(paths, model, device, batch_size, format, options, attention_dir, workers)


# --------------------------------------------------------------------------- evaluate

@app.command()
@handle_errors
def evaluate(
    data: DataOpt = None,
    captions: CaptionsOpt = None,
    images: ImagesOpt = None,
    model: ModelOpt = None,
    split_name: Annotated[str, typer.Option("--split", help="Which split to caption and score: test, val or train.")] = "test",
    split_ratios: Annotated[Optional[str], typer.Option("--split-ratios", help="Train/val/test percentages for the hash split (default: those the model was trained with).")] = None,
    beam_size: Annotated[int, typer.Option("--beam-size", "-k", help="1: greedy; more: beam search.", min=1)] = 1,
    max_len: MaxLenOpt = 30,
    length_penalty: PenaltyOpt = 1.0,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = Device.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as one JSON object.")] = False,
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the generated captions here (JSONL: path, caption, references).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N images of the split.", min=1)] = None,
):
    """Caption a split of a dataset and score it: BLEU-1..4, METEOR (with Java), ROUGE-L, CIDEr."""
    from capcli.api import Captioner
    from capcli.datasets import load_dataset, parse_split_ratios
    from capcli.evaluate import evaluate_model
    from capcli.sampling import DecodeOptions

    if split_name not in ("train", "val", "test"):
        raise CapcliError(f"--split {split_name!r}: choose test, val or train")
    captioner = Captioner.load(model, device.value)
    ratios = split_ratios or captioner.training.get("split") or "90/5/5"
    samples = load_dataset(data, captions_file=captions, images_dir=images, split_ratios=parse_split_ratios(ratios))
    chosen = [s for s in samples if s.split == split_name][:limit]
    if not chosen:
        raise CapcliError(f"{data or captions}: the {split_name} split is empty (split {ratios})")
    reporter = RichReporter()
    reporter.start(f"captioning {split_name}", len(chosen), unit="images")
    try:
        options = DecodeOptions(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
        scores, notes, results = evaluate_model(captioner, chosen, options, batch_size, on_result=lambda r: reporter.update(1))
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
    dist = sys.modules.get("capcli.distributed")  # imported only by training
    if dist is not None and dist.joined_a_group():
        dist.exit_process(code if isinstance(code, int) else 1)  # see there: torchrun workers skip shutdown
    sys.exit(code)


if __name__ == "__main__":
    main()
