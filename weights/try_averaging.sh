#!/usr/bin/env bash
# Issue 22's checkpoint averaging on the photo model: the shipped recipe (train_default_model.sh)
# trained one epoch at a time (an exact resume, so the same run as in one go) with every epoch's
# weights kept, then the weights of a few epochs averaged. The window is chosen on val (beam-3
# CIDEr), then scored on test. Resumable: finished epochs and scores are kept.
#   weights/try_averaging.sh [SEED] [DATA_DIR] [OUT_DIR]   -> OUT_DIR/scores.tsv (name split k CIDEr BLEU-4)
set -euo pipefail
cd "$(dirname "$0")/.."
source weights/photo_recipe.sh
SEED=${1:-0}
DATA=${2:-../shared/data/flickr8k-mini}
OUT=${3:-runs/try-averaging}
RUN=$OUT/seed$SEED
EPOCHS=14  # the shipped run's length: best epoch 8, stopped by --patience 6
mkdir -p "$RUN"
score() {  # NAME MODEL SPLIT...
  local name=$1 model=$2; shift 2
  for split in "$@"; do
    grep -q "^$name	$split	" "$OUT/scores.tsv" 2>/dev/null && continue
    capcli evaluate --data "$DATA" --split-ratios 80/10/10 --split "$split" -m "$model" -k 3 --device cpu --precision fp32 --json |
      python -c "import json, sys; d = json.load(sys.stdin); print('$name\t$split\t3\t%.4f\t%.4f' % (d['CIDEr'], d['BLEU-4']))" >> "$OUT/scores.tsv"
  done
}
for e in $(seq 1 $EPOCHS); do
  [ -f "$RUN/epoch$e.safetensors" ] && continue
  if [ -f "$RUN/last.safetensors" ]; then capcli train --resume "$RUN" --epochs "$e" --patience 99
  else capcli train --data "$DATA" -o "$RUN" --split-ratios 80/10/10 --seed "$SEED" --epochs "$e" --patience 99 \
      "${PHOTO_RECIPE[@]}"
  fi
  cp "$RUN/last.safetensors" "$RUN/epoch$e.safetensors"
done
score "s$SEED-best" "$RUN/best.safetensors" val test
# windows of epochs: around the usual best, the last ones, and most of the run
for window in "6 10" "8 12" "10 14" "4 14"; do
  set -- $window
  name="s$SEED-avg$1-$2"
  [ -f "$RUN/$name.safetensors" ] || python weights/average_models.py "$RUN/$name.safetensors" $(for e in $(seq "$1" "$2"); do echo "$RUN/epoch$e.safetensors"; done)
  score "$name" "$RUN/$name.safetensors" val test
done
