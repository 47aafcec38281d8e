"""capcli evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from capcli.cli.frame import RichReporter, app, handle_errors, log
from capcli.cli.options import (
    DATA,
    DECODING,
    OUTPUT,
    BatchOpt,
    CaptionsOpt,
    DataOpt,
    Device,
    DeviceOpt,
    ImagesOpt,
    MaxLenOpt,
    MaxPixelsOpt,
    ModelOpt,
    NoRepeatOpt,
    PenaltyOpt,
    CaptionPrecision,
    PrecisionOpt,
    Runtime,
    RuntimeOpt,
    SplitName,
)
from capcli.data.images import MAX_IMAGE_PIXELS
from capcli.errors import CapcliError
from capcli.infer.result_lines import json_line


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
    precision: PrecisionOpt = CaptionPrecision.auto,
    runtime: RuntimeOpt = Runtime.auto,
    beam_size: Annotated[int, typer.Option("--beam-size", "-k", help="1: greedy; more: beam search.", min=1, rich_help_panel=DECODING)] = 1,
    max_len: MaxLenOpt = None,
    length_penalty: PenaltyOpt = 1.0,
    no_repeat_ngram: NoRepeatOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as one JSON object.", rich_help_panel=OUTPUT)] = False,
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the captions here (JSONL, with references).", rich_help_panel=OUTPUT)] = None,
    batch_size: BatchOpt = 32,
    max_image_pixels: MaxPixelsOpt = MAX_IMAGE_PIXELS,
):
    """Caption a split of a dataset and score the captions against its references.

    Word models: BLEU-1..4, METEOR (with Java), ROUGE-L, CIDEr. Char and SMILES models: exact match
    and edit similarity, plus validity, canonical match and Tanimoto for SMILES when RDKit is installed.
    """
    from capcli.data.datasets import load_dataset, split_mismatch
    from capcli.data.splits import parse_split_ratios
    from capcli.files import atomic_write_bytes
    from capcli.infer.captioner import Captioner, model_path
    from capcli.infer.decode import DecodeOptions
    from capcli.infer.evaluate import evaluate_model

    split_name = split_name.value
    captioner = Captioner.load(model, device.value, precision.value, runtime.value)
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
    coverage = captioner.vocab.coverage(c for s in chosen for c in s.captions)
    if coverage < FITTING_COVERAGE:  # word models know ~100% of photo captions' words, 0% of SMILES
        log.warning("%s: its %s vocabulary knows %.0f%% of the reference tokens: the model does not fit this data "
                    "(a SMILES model on photo captions, or the reverse?)",
                    model_path(model), captioner.vocab.tokenizer, 100 * coverage)
    reporter = RichReporter()
    reporter.start(f"captioning {split_name}", len(chosen), unit="images")
    try:
        options = DecodeOptions(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)
        scores, notes, results = evaluate_model(captioner, chosen, options, batch_size, max_pixels=max_image_pixels,
                                                on_result=lambda r: reporter.update(1))
    except ValueError as e:
        raise CapcliError(str(e), exit_code=1) from None
    finally:
        reporter.stop()
    for note in notes:
        log.warning("%s", note)
    if save is not None:
        refs = {str(s.image): list(s.captions) for s in chosen}
        lines = [json_line({"path": r.path, "caption": r.caption, "references": refs[r.path]} if r.ok
                           else {"path": r.path, "error": r.error}) for r in results]  # a name's non-UTF-8 bytes escaped
        atomic_write_bytes(save, ("\n".join(lines) + "\n").encode())
    # what ran the encoder: the same model scores differently in int8, which auto picks on some CPUs
    encoder = {"runtime": captioner.encoder.runtime, "precision": captioner.precision}
    summary = {"split": split_name, "images": len(chosen), "beam_size": beam_size, **encoder, **scores}
    if as_json:
        print(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(chosen)} {split_name} images, " + ("greedy" if beam_size == 1 else f"beam {beam_size}")
                  + f", encoder {encoder['precision']} on {encoder['runtime']}")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in scores.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)


FITTING_COVERAGE = 0.5  # evaluate warns below this share of reference tokens known to the model's vocabulary


