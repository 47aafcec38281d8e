#!/usr/bin/env bash
# Rebuilds weights/encoders/: the int8 encoders of the shipped models (OpenVINO IR, .xml + .bin),
# each calibrated on 300 images of its own model's train split: flickr8k-mini photos for the photo
# model, RDKit drawings of train molecules for the SMILES model. About 5 minutes on 2 cores.
# Needs: pip install -e '.[quantize,chem]'. What the recipe is and what it keeps: docs/precision.md.
#   weights/quantize_encoders.sh [FLICKR8K_MINI] [SMILES_CSV] [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MINI=${1:-../shared/data/flickr8k-mini}
SMILES=${2:-../shared/data/molecules/smiles.csv}
WORK=${3:-runs/calibration}
mkdir -p "$WORK"

# A folder of links to the train images of a dataset, split as the model was trained.
train_images() {  # DATA_DIR SPLIT_RATIOS OUT_DIR
    python - "$@" <<'PY'
import os, sys
from pathlib import Path
from capcli.data.datasets import load_dataset
from capcli.data.splits import parse_split_ratios
data, ratios, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
samples = load_dataset(data, split_ratios=parse_split_ratios(ratios) if ratios != "own" else None).samples
for s in samples:
    link = out / s.image.name
    if s.split == "train" and not link.exists():
        os.symlink(s.image.resolve(), link)
PY
}

train_images "$MINI" 80/10/10 "$WORK/photos"
capcli quantize -m weights/capcli-lite0-flickr8k-mini.safetensors --calibration "$WORK/photos" -o weights/encoders

# The molecules drawn as the SMILES model was trained (RDKit's default depiction, no variants);
# make_dataset.py splits by molecule, so only train molecules are linked.
python examples/molecules/make_dataset.py "$SMILES" "$WORK/molecules-data" --variants 1 --test-sizes ""
train_images "$WORK/molecules-data" own "$WORK/drawings"
capcli quantize -m weights/capcli-lite0-smiles.safetensors --calibration "$WORK/drawings" -o weights/encoders
