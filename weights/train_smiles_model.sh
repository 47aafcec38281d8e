#!/usr/bin/env bash
# Rebuilds weights/capcli-lite0-smiles.safetensors, the molecule reader, on the CPU (about 3 hours
# on 2 cores), in two stages. 1: the decoder over the frozen encoder (~4 min to render the images,
# ~12 min to cache their features, then ~5 min per epoch, 18 epochs). 2: from stage 1's model, the
# encoder's top 2 blocks (blocks.6 and the head) trained on the drawings too, over a cache of the
# frozen part below them (~25 min to cache, ~13 min per epoch, 4 epochs; the best is epoch 3).
# Needs RDKit: pip install -e '.[chem]'. Settings and their story: weights/README.md.
#   weights/train_smiles_model.sh [SMILES_CSV] [DATA_DIR] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SMILES=${1:-../shared/data/molecules/smiles.csv}
DATA=${2:-runs/molecules-data}
RUN=${3:-runs/smiles-model}
# 6028 train molecules x 2 drawings (RDKit's default at 300 px + one varied) + 3000 BRICS recombinations
# x 2; val and test molecules (5% each, by a hash of the SMILES) drawn once, RDKit's default at 300 px.
[ -d "$DATA/Images" ] || python examples/molecules/make_dataset.py "$SMILES" "$DATA" --variants 2 --brics 3000
# Stage 1 (the reader shipped before December 2026), kept in fp16 as it was shipped then.
capcli train --data "$DATA" -o "$RUN" --tokenizer smiles --image-size 384 --device cpu --precision fp32 --seed 0 \
    --epochs 18 --batch-size 64 --lr 1e-3 --patience 6 --lr-patience 2
python weights/to_fp16.py "$RUN/best.safetensors" "$RUN/stage1-fp16.safetensors"
# Stage 2: the top of the encoder learns drawings, the decoder at half stage 1's learning rate.
capcli train --data "$DATA" -o "$RUN-ft" --init "$RUN/stage1-fp16.safetensors" --device cpu --precision fp32 \
    --seed 0 --epochs 4 --batch-size 64 --lr 5e-4 --fine-tune-blocks 2 --encoder-lr 1e-4 --patience 3 --lr-patience 1
# Ship the best epoch (by val edit similarity) in fp16.
python weights/to_fp16.py "$RUN-ft/best.safetensors" weights/capcli-lite0-smiles.safetensors
