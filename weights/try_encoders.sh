#!/usr/bin/env bash
# The encoder experiments of issue 22 behind the table in weights/README.md: the shipped recipe
# (train_default_model.sh's settings) with Lite1/Lite2, larger images and finer grids, and the top
# of the encoder fine-tuned over a cache; each best model scored greedy and at beam 3 on val and
# test. Resumable: a finished run is only scored again. Needs `pip install 'capcli[encoders]'`.
#   weights/try_encoders.sh [DATA_DIR] [OUT_DIR]      -> OUT_DIR/scores.tsv (name split k CIDEr BLEU-4)
set -euo pipefail
cd "$(dirname "$0")/.."
source weights/photo_recipe.sh
DATA=${1:-../shared/data/flickr8k-mini}
OUT=${2:-runs/try-encoders}
mkdir -p "$OUT"
score() {  # NAME MODEL
  for split in val test; do
    for k in 1 3; do
      capcli evaluate --data "$DATA" --split-ratios 80/10/10 --split $split -m "$2" -k $k --device cpu --precision fp32 --json |
        python -c "import json, sys; d = json.load(sys.stdin); print('$1\t$split\t$k\t%.4f\t%.4f' % (d['CIDEr'], d['BLEU-4']))" >> "$OUT/scores.tsv"
    done
  done
}
run() {  # NAME OPTIONS...
  local name=$1; shift
  if [ ! -f "$OUT/$name/done" ]; then
    if [ -f "$OUT/$name/last.safetensors" ]; then capcli train --resume "$OUT/$name"
    else capcli train --data "$DATA" -o "$OUT/$name" --split-ratios 80/10/10 --seed 0 --epochs 25 --patience 6 \
        "${PHOTO_RECIPE[@]}" "$@"
    fi
    touch "$OUT/$name/done"
    score "$name" "$OUT/$name/best.safetensors"
  fi
}
[ -f "$OUT/shipped.scored" ] || { score shipped weights/capcli-lite0-flickr8k-mini.safetensors; touch "$OUT/shipped.scored"; }
run lite1-224 --encoder lite1
run lite2-224 --encoder lite2
run lite2-260 --encoder lite2 --image-size 260
run lite0-448-grid14 --image-size 448 --grid 14
run lite0-ft1 --fine-tune-blocks 1
run lite0-ft1-s1 --fine-tune-blocks 1 --seed 1  # the last --seed wins
run lite0-ft1-s2 --fine-tune-blocks 1 --seed 2
run lite0-s1 --seed 1  # the shipped recipe's own seeds, scored as the rows above
run lite0-s2 --seed 2
