#!/usr/bin/env bash
# Issue 22's "train on more of the mini set": the shipped recipe with --split-ratios 85/5/10 instead
# of 80/10/10. The hash split cuts at 0.85 and 0.90 instead of 0.80 and 0.90, so the test images
# are the same 68; half of the old val moves to train (the val left is the other half).
#   weights/try_more_train.sh [SEED] [DATA_DIR] [OUT_DIR]   -> OUT_DIR/scores.tsv (name split k CIDEr BLEU-4)
set -euo pipefail
cd "$(dirname "$0")/.."
source weights/photo_recipe.sh
SEED=${1:-0}
DATA=${2:-../shared/data/flickr8k-mini}
OUT=${3:-runs/try-more-train}
RUN=$OUT/s$SEED
mkdir -p "$OUT"
if [ ! -f "$RUN/done" ]; then
  if [ -f "$RUN/last.safetensors" ]; then capcli train --resume "$RUN"
  else capcli train --data "$DATA" -o "$RUN" --split-ratios 85/5/10 --seed "$SEED" --epochs 25 --patience 6 \
      "${PHOTO_RECIPE[@]}"
  fi
  touch "$RUN/done"
fi
for split in val test; do
  grep -q "^s$SEED	$split	" "$OUT/scores.tsv" 2>/dev/null && continue
  capcli evaluate --data "$DATA" --split-ratios 85/5/10 --split $split -m "$RUN/best.safetensors" -k 3 --device cpu --precision fp32 --json |
    python -c "import json, sys; d = json.load(sys.stdin); print('s$SEED\t$split\t3\t%.4f\t%.4f' % (d['CIDEr'], d['BLEU-4']))" >> "$OUT/scores.tsv"
done
