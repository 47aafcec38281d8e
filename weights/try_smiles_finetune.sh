#!/usr/bin/env bash
# Issue 22's molecule experiment: the encoder trained on drawings. The shipped reader continues on
# its own data (train_smiles_model.sh's recipe: the shared set, --variants 2 --brics 3000, drawn on
# the fly from a table) with the encoder's top 2 blocks (blocks.6 and the head) trained too, over a
# cache of the frozen part below them; the decoder at half the shipped learning rate. The shipped
# model and the new one are scored on the same val and test molecules at beam 3 (test also at 224
# and 500 px). Resumable: a stopped run continues, a finished one is only scored again. Needs RDKit
# (pip install -e '.[chem]').
#   weights/try_smiles_finetune.sh [BLOCKS] [SMILES_CSV] [OUT_DIR]   -> OUT_DIR/scores.tsv
set -euo pipefail
cd "$(dirname "$0")/.."
BLOCKS=${1:-2}
SMILES=${2:-../shared/data/molecules/smiles.csv}
OUT=${3:-runs/try-smiles-finetune}
DATA=$OUT/data
RUN=$OUT/blocks$BLOCKS
mkdir -p "$OUT"
[ -f "$DATA/molecules.csv" ] || python examples/molecules/make_dataset.py "$SMILES" "$DATA" --variants 2 --brics 3000 --table
source weights/molecule_scores.sh
score() { score_molecules "$1" "$2" "$DATA" "$OUT/scores.tsv"; }
[ -f "$OUT/shipped.scored" ] || { score shipped weights/capcli-lite0-smiles.safetensors; touch "$OUT/shipped.scored"; }
if [ ! -f "$RUN/done" ]; then
  if [ -f "$RUN/last.safetensors" ]; then capcli train --resume "$RUN"
  else capcli train --data "$DATA" -o "$RUN" --init weights/capcli-lite0-smiles.safetensors --device cpu --precision fp32 \
      --seed 0 --epochs 4 --batch-size 64 --lr 5e-4 --fine-tune-blocks "$BLOCKS" --encoder-lr 1e-4 --patience 3 --lr-patience 1
  fi
  touch "$RUN/done"
  score "blocks$BLOCKS" "$RUN/best.safetensors"
fi
