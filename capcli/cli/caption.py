"""capcli caption and capcli beam: one image or a whole collection."""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Optional
from urllib.parse import urlsplit

import typer
from typing_extensions import Annotated

from capcli.cli.frame import RichReporter, app, handle_errors, is_quiet, log
from capcli.cli.options import (
    DECODING,
    AttnDirOpt,
    BatchOpt,
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    MaxLenOpt,
    MaxPixelsOpt,
    ModelOpt,
    OutputOpt,
    OverwriteOpt,
    PathsArg,
    NoRepeatOpt,
    PenaltyOpt,
    CaptionPrecision,
    PrecisionOpt,
    Runtime,
    RuntimeOpt,
    ResumeOpt,
    ShardOpt,
    SidecarDirOpt,
    SidecarOpt,
    WorkersOpt,
)
from capcli.data.images import MAX_IMAGE_PIXELS
from capcli.data.urls import is_url
from capcli.errors import CapcliError
from capcli.progress import Reporter


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


@dataclasses.dataclass
class ModelChoice:
    """--model, --device, --precision and --runtime, as given."""
    model: Optional[str]
    device: str
    precision: str
    runtime: str


def _caption_command(paths, chosen: ModelChoice, batch_size, options, attention_dir, workers, max_pixels,
                     out: CollectionOptions):
    """Check the options, open this process's outputs (every process stopping together on a
    problem), caption, then merge, count and report."""
    from capcli.runtime import distributed

    ctx = distributed.setup()  # torchrun: one share per process; alone: no-op
    paths, fmt, (index, count), to_stdout = _checked(paths, out, options, ctx)
    outputs, captioner, items, found = _opened(paths, out, fmt, index, count, ctx, chosen,
                                               attention_dir, batch_size)
    counts = _captioned(captioner, outputs, items, found, options, batch_size, workers, max_pixels,
                        attention_dir, to_stdout, ctx)
    _finished(ctx, counts, out, fmt, count, found, paths)


def _checked(paths, out: CollectionOptions, options, ctx):
    """(paths, result format, (share, of shares), results to stdout?) once the options are known to fit together."""
    from capcli.infer.result_files import TEXT_CANNOT_RESUME
    from capcli.infer.result_lines import output_format
    from capcli.infer.shards import parse_shard

    fmt = output_format(out.fmt.value if out.fmt else None, out.output)
    if out.resume and out.output is None:
        raise CapcliError("--resume continues an -o FILE: give the file")
    if out.resume and fmt == "text":
        raise CapcliError(TEXT_CANNOT_RESUME)
    if out.sidecar_dir is not None and out.sidecar is None:
        out.sidecar = ".txt"
    if options.nbest > 1 and fmt != "jsonl":
        # A warning, not a refusal: the captions are right; only the alternatives have nowhere to go
        log.warning("--nbest %d: %s output has one caption per image; only jsonl (-f jsonl) has the alternatives",
                    options.nbest, fmt)
    if not paths:
        if sys.stdin.isatty():
            raise CapcliError("give image paths, folders, or - to read paths from stdin (see --help)")
        paths = ["-"]
    if ctx.enabled and out.shard is not None:
        raise CapcliError("--shard is for independent jobs; under torchrun each process takes its share already")
    index, count = parse_shard(out.shard) if out.shard else (ctx.rank, ctx.world_size)
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
    return paths, fmt, (index, count), to_stdout


def _opened(paths, out: CollectionOptions, fmt, index, count, ctx, chosen: ModelChoice, attention_dir, batch_size):
    """(this process's Outputs, the Captioner, its images, how many were found: None for stdin)."""
    from capcli.data.listing import expand_paths
    from capcli.infer.captioner import Captioner
    from capcli.infer.collection import Outputs
    from capcli.infer.result_files import read_done
    from capcli.infer.shards import share
    from capcli.infer.sidecars import Sidecars, writable_folder
    from capcli.runtime import distributed

    # What can fail in one process alone (its part file exists or another run has it, a folder it
    # cannot write) is found before the first collective, and every process stops on it together:
    # none is left waiting for one that has gone.
    outputs, problem = None, None
    try:
        try:
            sidecars = None if out.sidecar is None else Sidecars(
                out.sidecar, out.sidecar_dir, [p for p in paths if os.path.isdir(p)], out.overwrite)
            if attention_dir is not None:
                writable_folder(attention_dir, "--attention-dir")
            # A folder is listed first (its total drives the progress bar, and shares need it); stdin streams.
            listed = count > 1 or "-" not in paths
            items = list(expand_paths(paths)) if listed else expand_paths(paths)
            found = len(items) if listed else None
            if listed:
                items = share(items, index, count, batch_size)
                if found and not items:  # shares are whole batches, so few images leave the last shares empty
                    log.warning("%s: this share is empty: the %d images make %d batches of --batch-size %d",
                                f"--shard {out.shard}" if out.shard else f"process {index} of {count}",
                                found, math.ceil(found / batch_size), batch_size)
            also_done = read_done(out.output, fmt) if ctx.enabled and out.resume and out.output.exists() else None
            outputs = Outputs(fmt, out.output, out.resume, sidecars, index, count, also_done)
            device = str(distributed.training_device(ctx, chosen.device))
            captioner = Captioner.load(chosen.model, device, chosen.precision, chosen.runtime,
                                       images=len(items) if listed else None)
        except CapcliError as e:
            problem = e
        _stop_together(ctx, problem)
    except BaseException:
        if outputs is not None:
            outputs.close(failed=True)  # a result file this run made, still empty, goes again
        raise
    return outputs, captioner, items, found


def _captioned(captioner, outputs, items, found, options, batch_size, workers, max_pixels, attention_dir,
               to_stdout, ctx):
    """Caption this process's images, writing each result as it comes; returns the counts of all processes."""
    from capcli.infer.collection import Counts
    from capcli.infer.result_lines import line_bytes, printable
    from capcli.runtime import distributed

    todo = outputs.todo(items)
    reporter = RichReporter() if ctx.is_main and not is_quiet() else Reporter()
    reporter.start("captioning", len(items) if found is not None else None, "images")
    counts, shown = outputs.counts, 0
    names_used: set[str] = set()
    tick = time.perf_counter()
    failed = True
    try:
        for r in captioner.caption_stream(todo, options, batch_size, workers, max_pixels=max_pixels):
            line = outputs.put(r)
            if not r.ok:
                sys.stderr.write(f"capcli: {printable(r.path)}: {printable(r.error)}\n")
            if line is not None and to_stdout:
                sys.stdout.buffer.write(line_bytes(line))  # bytes: a name that is not UTF-8 as it is
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
        outputs.close(failed)
    try:
        counts = sum(distributed.all_gather_object(ctx, counts), Counts())  # every process's
    except Exception as e:
        if not distributed.is_failure(e):
            raise
        raise CapcliError(distributed.failure_message(ctx, e, None, task="captioning") +
                          "; run the same command with --resume to continue", exit_code=1) from None
    return counts


def _finished(ctx, counts, out: CollectionOptions, fmt, count, found, paths) -> None:
    """Merge the parts of several processes, say what was done, and exit 1 if an image failed."""
    from capcli.infer.shards import merge_parts, part_path

    if ctx.enabled and out.output is not None and ctx.is_main:
        parts = [part_path(out.output, r, count) for r in range(count)]
        lines = merge_parts(out.output, parts, fmt)
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
    from capcli.data.images import ImageError, load_image
    from capcli.infer import attention_pictures as attention_map
    from capcli.infer.result_lines import printable

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
    precision: PrecisionOpt = CaptionPrecision.auto,
    runtime: RuntimeOpt = Runtime.auto,
    max_len: MaxLenOpt = None,
    length_penalty: PenaltyOpt = 1.0,
    no_repeat_ngram: NoRepeatOpt = None,
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
    """Caption images with greedy decoding (fast).

    Examples:
    $ capcli caption photos/ --format tsv
    $ capcli caption photos/ --sidecar .txt      (photo.jpg -> photo.txt)
    $ capcli caption photos/ -o out.jsonl --resume
    """
    from capcli.infer.decode import DecodeOptions

    options = DecodeOptions(beam_size=1, max_len=max_len, length_penalty=length_penalty,
                            no_repeat_ngram=no_repeat_ngram)
    out = CollectionOptions(format, output, resume, sidecar, sidecar_dir, overwrite, shard)
    chosen = ModelChoice(model, device.value, precision.value, runtime.value)
    _caption_command(paths, chosen, batch_size, options, attention_dir, workers, max_image_pixels, out)


@app.command()
@handle_errors
def beam(
    paths: PathsArg = None,
    model: ModelOpt = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = CaptionPrecision.auto,
    runtime: RuntimeOpt = Runtime.auto,
    beam_size: Annotated[int, typer.Option("--beam-size", "-k", help="Beams per image.", min=1, rich_help_panel=DECODING)] = 3,
    nbest: Annotated[int, typer.Option(help="Captions per image to report (jsonl 'alternatives').", min=1, rich_help_panel=DECODING)] = 1,
    max_len: MaxLenOpt = None,
    length_penalty: PenaltyOpt = 1.0,
    no_repeat_ngram: NoRepeatOpt = None,
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
    """Caption images with beam search, many images decoded together.

    Examples:
    $ capcli beam -k 5 photo.jpg
    $ capcli beam -k 5 --nbest 3 photos/ -o out.jsonl
    $ torchrun --nproc-per-node 8 -m capcli beam photos/ -o out.jsonl
    (under torchrun: one share per GPU, merged in order)
    """
    if nbest > beam_size:
        raise CapcliError(f"--nbest {nbest} is larger than --beam-size {beam_size}")
    from capcli.infer.decode import DecodeOptions

    options = DecodeOptions(beam_size=beam_size, nbest=nbest, max_len=max_len, length_penalty=length_penalty,
                            no_repeat_ngram=no_repeat_ngram)
    out = CollectionOptions(format, output, resume, sidecar, sidecar_dir, overwrite, shard)
    chosen = ModelChoice(model, device.value, precision.value, runtime.value)
    _caption_command(paths, chosen, batch_size, options, attention_dir, workers, max_image_pixels, out)




