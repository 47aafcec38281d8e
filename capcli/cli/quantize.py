"""capcli quantize."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from capcli.choices import CALIBRATION_IMAGES
from capcli.cli.frame import RichReporter, app, handle_errors, is_quiet
from capcli.cli.options import INPUT, OUTPUT, ModelOpt


@app.command("quantize")
@handle_errors
def quantize(
    model: ModelOpt = None,
    calibration: Annotated[Path, typer.Option("--calibration", "-c", help="Folder of images like the ones the model will read (photos for a photo model, drawings for a SMILES model), searched recursively.", show_default=False, rich_help_panel=INPUT)] = ...,
    count: Annotated[int, typer.Option("--count", "-n", help="Calibration images, spread over the folder.", min=8, rich_help_panel=INPUT)] = CALIBRATION_IMAGES,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where to write the int8 encoder (default: capcli's cache folder, where captioning looks).", show_default=False, rich_help_panel=OUTPUT)] = None,
):
    """Make an int8 version of a model's encoder, for --precision int8 on the CPU (OpenVINO).

    Prints the path of the int8 encoder. Models with the same encoder weights share it.
    """
    from capcli.infer.quantize import calibration_images, quantize_encoder
    from capcli.infer.shipped import model_path
    from capcli.model.files import load_model

    file = model_path(model)
    loaded = load_model(file, "cpu")
    images = calibration_images(calibration, count)
    reporter = None if is_quiet() else RichReporter()
    path, difference = quantize_encoder(loaded.model, loaded.vocab.tokenizer, images, output_dir, reporter)
    typer.echo(f"int8 encoder features differ from fp32 by {difference:.1%} (relative L2, mean over "
               f"{min(len(images), 32)} calibration images)", err=True)
    print(path, flush=True)
