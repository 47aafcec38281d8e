"""capcli export."""

from __future__ import annotations

from pathlib import Path

import typer
from typing_extensions import Annotated

from capcli.cli.frame import app, handle_errors
from capcli.cli.options import OUTPUT, ExportFormat, ModelOpt
from capcli.errors import CapcliError


@app.command("export")
@handle_errors
def export(
    model: ModelOpt = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Folder to write the files into.", show_default=False, rich_help_panel=OUTPUT)] = ...,
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx: encoder.onnx, init.onnx, step.onnx (the decoder's single step), config.json, vocab.json.", rich_help_panel=OUTPUT)] = ExportFormat.onnx,
):
    """Write a model as graphs any runtime can serve, with its vocabulary and config as JSON.

    Prints the paths written.
    """
    from capcli.infer.shipped import model_path
    from capcli.model.export import export_onnx
    from capcli.model.files import load_model

    loaded = load_model(model_path(model), "cpu")
    try:
        written = export_onnx(loaded.model, loaded.vocab, output_dir)
    except ImportError as e:
        raise CapcliError(f"capcli export needs {e.name or 'onnx'}, which is not installed: pip install 'capcli[export]'") from None
    except OSError as e:
        raise CapcliError(f"{e.filename or output_dir}: cannot write ({e.strerror or e})") from None
    for path in written:
        print(path, flush=True)
