"""The shipped models: their short names (--model smiles) and where their files are."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from capcli.errors import CapcliError

DEFAULT_MODEL_NAME = "capcli-lite0-flickr8k-mini.safetensors"
# Short names of the shipped models, for --model NAME.
SHIPPED_MODELS = {
    "default": DEFAULT_MODEL_NAME,
    "captions": DEFAULT_MODEL_NAME,
    "smiles": "capcli-lite0-smiles.safetensors",
}


def weights_dirs() -> list[Path]:
    """Where the shipped files are: the repository's weights/ (source checkout, editable install),
    else the installed copy."""
    return [
        Path(__file__).resolve().parents[2] / "weights",
        Path(sys.prefix) / "share" / "capcli" / "weights",
    ]


def _shipped(file_name: str) -> Path:
    candidates = [folder / file_name for folder in weights_dirs()]
    for path in candidates:
        if path.is_file():
            return path
    raise CapcliError(
        f"shipped model {file_name} not found ({candidates[0]} is missing); pass --model FILE, "
        f"or train one with: capcli train --data DIR -o RUN_DIR"
    )


def default_model_path() -> Path:
    """$CAPCLI_MODEL (a file or a shipped model's short name), else the shipped photo model in the
    repository's weights/ (or the installed copy)."""
    if env := os.environ.get("CAPCLI_MODEL"):
        return _named_or_path(env)
    return _shipped(DEFAULT_MODEL_NAME)


def model_path(model: str | Path | None) -> Path:
    """A --model value -> a file: None is the default model ($CAPCLI_MODEL, else the shipped photo
    model), a shipped model's short name (default, captions, smiles) is that model, anything else
    is a path. A file of that name in the working folder wins over a short name."""
    if model is None:
        return default_model_path()
    if model == "default" and not Path(model).exists():
        return default_model_path()  # follows $CAPCLI_MODEL too; "captions" is always the photo model
    return _named_or_path(model)


def _named_or_path(model: str | Path) -> Path:
    if isinstance(model, str) and model in SHIPPED_MODELS and not Path(model).exists():
        return _shipped(SHIPPED_MODELS[model])
    return Path(model)
