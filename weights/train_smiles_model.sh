#!/usr/bin/env bash
# Rebuilds weights/capcli-lite0-smiles.safetensors, the molecule reader, on the CPU (about 2 hours
# on 2 cores: ~4 min to render the images, ~12 min to cache their features, then ~5 min per epoch).
# Needs RDKit: pip install -e '.[chem]'. Settings and their story: weights/README.md.
#   weights/train_smiles_model.sh [SMILES_CSV] [DATA_DIR] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SMILES=${1:-../shared/data/molecules/smiles.csv}
DATA=${2:-runs/molecules-data}
RUN=${3:-runs/smiles-model}
# 6028 train molecules x 2 drawings (RDKit's default at 300 px + one varied) + 3000 BRICS recombinations
# x 2; val and test molecules (5% each, by a hash of the SMILES) drawn once, RDKit's default at 300 px.
python examples/molecules/make_dataset.py "$SMILES" "$DATA" --variants 2 --brics 3000
capcli train --data "$DATA" -o "$RUN" --tokenizer smiles --image-size 384 --device cpu --precision fp32 --seed 0 \
    --epochs 18 --batch-size 64 --lr 1e-3 --patience 6 --lr-patience 2
# Ship the best epoch (by val edit similarity) in fp16.
python weights/to_fp16.py "$RUN/best.safetensors" weights/capcli-lite0-smiles.safetensors
