# The shipped photo model's training options, sourced by train_default_model.sh and by the photo
# experiments, so each experiment changes one thing against the recipe it names. The split, seed,
# epochs and patience stay in each script: some experiments change them.
PHOTO_RECIPE=(--device cpu --lr 1e-3 --lr-patience 3 --batch-size 64
              --embed-dim 128 --attention-dim 128 --decoder-dim 256 --dropout 0.3 --label-smoothing 0.1)
