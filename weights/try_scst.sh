#!/usr/bin/env bash
# The self-critical experiments behind the table in docs/experiments.md and weights/README.md:
# cross-entropy models with the shipped settings (seeds 0, 1, 2), self-critical runs from each,
# every best model scored at beam 3 on val and test. About 95 minutes on 2 CPU cores.
#   weights/try_scst.sh [DATA_DIR] [OUT_DIR]      -> OUT_DIR/scores.tsv
set -euo pipefail
cd "$(dirname "$0")/.."
source weights/photo_recipe.sh
DATA=${1:-../shared/data/flickr8k-mini}
OUT=${2:-runs/try-scst}
mkdir -p "$OUT"
score() {  # NAME MODEL: val and test CIDEr and BLEU-4 at beam 3
  for split in val test; do
    capcli evaluate --data "$DATA" --split-ratios 80/10/10 --split $split -m "$2" -k 3 --device cpu --precision fp32 --json |
      python -c "import json, sys; d = json.load(sys.stdin); print('$1\t$split\t%.4f\t%.4f' % (d['CIDEr'], d['BLEU-4']))" >> "$OUT/scores.tsv"
  done
}
scst() {  # NAME XE_MODEL OPTIONS...
  local name=$1 init=$2; shift 2
  [ -f "$OUT/$name/best.safetensors" ] || capcli train --data "$DATA" -o "$OUT/$name" --split-ratios 80/10/10 --seed 0 \
      --device cpu --init "$init" --scst-after 0 --epochs 25 --patience 6 --lr-patience 3 --batch-size 64 --val-beam 3 "$@"
  score "$name" "$OUT/$name/best.safetensors"
}
for seed in 0 1 2; do
  xe=$OUT/xe-s$seed
  [ -f "$xe/best.safetensors" ] || capcli train --data "$DATA" -o "$xe" --split-ratios 80/10/10 --seed $seed \
      --epochs 25 --patience 6 "${PHOTO_RECIPE[@]}"
  score "xe-s$seed" "$xe/best.safetensors"
  scst "s$seed-d0" "$xe/best.safetensors" --dropout 0
  scst "s$seed-d0-lr2e4" "$xe/best.safetensors" --dropout 0 --scst-lr 2e-4
done
for seed in 0 1 2; do  # cross-entropy without label smoothing, then SCST
  xe=$OUT/xenols-s$seed
  [ -f "$xe/best.safetensors" ] || capcli train --data "$DATA" -o "$xe" --split-ratios 80/10/10 --seed $seed \
      --epochs 25 --patience 6 "${PHOTO_RECIPE[@]}" --label-smoothing 0  # the last --label-smoothing counts
  score "xenols-s$seed" "$xe/best.safetensors"
  scst "nols-s$seed-d0" "$xe/best.safetensors" --dropout 0
done
scst s0-d0-greedy "$OUT/xe-s0/best.safetensors" --dropout 0 --scst-baseline greedy
scst s0-d3-lr2e4 "$OUT/xe-s0/best.safetensors" --scst-lr 2e-4
scst s0-d0-k10-lr1e4 "$OUT/xe-s0/best.safetensors" --dropout 0 --scst-samples 10 --scst-lr 1e-4
column -t "$OUT/scores.tsv"
