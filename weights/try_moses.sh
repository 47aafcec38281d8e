#!/usr/bin/env bash
# Issue 22's molecule experiment: the shipped reader trained on, with MOSES molecules added to its
# data, all drawn on the fly (make_dataset.py --table: no image files). The data is the shipped
# recipe's (train_smiles_model.sh: the shared set, --variants 2 --brics 3000) plus N MOSES molecules,
# each drawn twice, never a val or test molecule; training continues from the shipped model at half
# its learning rate for 2 epochs (~18 min an epoch on 2 cores, after ~50 min drawing and caching
# 38k drawings at 384 px; a third epoch, resumed by hand, was worse on val). The shipped model and the new one are scored on the same val and test
# molecules at beam 3 (test also at 224 and 500 px). Resumable: a stopped run continues, a finished
# one is only scored again. The figures in docs/experiments.md were made from the reader shipped
# then, stage 1 of train_smiles_model.sh; today's shipped reader has its encoder's top trained too.
# Needs RDKit and MOSES's data (pip install -e '.[chem]'; pip install --no-deps molsets, or
# MOSES_FILE=the molsets wheel).
#   weights/try_moses.sh [N_MOSES] [SMILES_CSV] [OUT_DIR]   -> OUT_DIR/scores.tsv
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
SMILES=${2:-../shared/data/molecules/smiles.csv}
OUT=${3:-runs/try-moses}
DATA=$OUT/data-moses$N
RUN=$OUT/moses$N
mkdir -p "$OUT"
[ -f "$DATA/molecules.csv" ] || python examples/molecules/make_dataset.py "$SMILES" "$DATA" --variants 2 --brics 3000 \
    --moses "$N" ${MOSES_FILE:+--moses-file "$MOSES_FILE"} --table
source weights/molecule_scores.sh
[ -f "$OUT/shipped.scored" ] || { score_molecules shipped weights/capcli-lite0-smiles.safetensors "$DATA" "$OUT/scores.tsv"; touch "$OUT/shipped.scored"; }
if [ ! -f "$RUN/done" ]; then
  if [ -f "$RUN/last.safetensors" ]; then capcli train --resume "$RUN"
  else capcli train --data "$DATA" -o "$RUN" --init weights/capcli-lite0-smiles.safetensors --device cpu --precision fp32 \
      --seed 0 --epochs 2 --batch-size 64 --lr 5e-4 --patience 3 --lr-patience 1
  fi
  touch "$RUN/done"
  score_molecules "moses$N" "$RUN/best.safetensors" "$DATA" "$OUT/scores.tsv"
fi
