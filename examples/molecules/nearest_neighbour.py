"""The baseline a molecule reader must beat: answer with the SMILES of the most similar training
image, by the cosine of mean-pooled encoder features (the model's own encoder, so the comparison
is with what the model sees).

    python examples/molecules/nearest_neighbour.py MODEL DATA_DIR [--captions FILE] [--train-pattern _v0]

DATA_DIR is a make_dataset.py folder; the test split of DATA_DIR/captions.txt (or of --captions,
e.g. captions_test_sizes.csv) is answered from the train split's images whose file name contains
--train-pattern (default `_v0`: each training molecule's default depiction; '' for all). Prints
the scores capcli evaluate prints, as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from capcli.infer.captioner import Captioner
from capcli.data.datasets import load_dataset
from capcli.metrics.captions import score_predictions
from capcli.data.images import ImageError, image_batches, normalize_pixels


def mean_features(captioner: Captioner, paths: list[Path]) -> torch.Tensor:
    """(N, D) unit-length mean-pooled encoder features, in the order of ``paths``."""
    cfg, out = captioner.cfg, []
    for k, items in enumerate(image_batches(paths, cfg.image_size, 32, 2)):
        bad = [str(t) for _, t in items if isinstance(t, ImageError)]
        if bad:
            sys.exit(f"nearest_neighbour: {bad[0]}")
        pixels = torch.stack([t for _, t in items])  # (n, S, S, 3) uint8
        features = captioner.encode(normalize_pixels(pixels, cfg.mean, cfg.std)).mean(1)  # (n, D)
        out.append(torch.nn.functional.normalize(features, dim=1))
        if k % 50 == 0:
            print(f"nearest_neighbour: {sum(len(o) for o in out)}/{len(paths)} images encoded", file=sys.stderr)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("data", type=Path)
    ap.add_argument("--captions", type=Path, help="score this caption file's test split instead")
    ap.add_argument("--train-pattern", default="_v0")
    args = ap.parse_args()
    captioner = Captioner.load(args.model, "cpu")
    samples = load_dataset(args.data).samples
    train = [s for s in samples if s.split == "train" and args.train_pattern in s.image.name]
    test = load_dataset(captions_file=args.captions, images_dir=args.data / "Images").samples if args.captions else samples
    test = [s for s in test if s.split == "test"]
    nearest = (mean_features(captioner, [s.image for s in test]) @
               mean_features(captioner, [s.image for s in train]).T).argmax(1)  # (n_test,)
    references = {str(s.image): list(s.captions) for s in test}
    candidates = {str(s.image): train[int(j)].captions[0] for s, j in zip(test, nearest)}
    scores, notes = score_predictions(references, candidates, captioner.vocab.tokenizer)
    for note in notes:
        print(f"nearest_neighbour: {note}", file=sys.stderr)
    print(json.dumps({"test_images": len(test), "train_images": len(train), **scores}))


if __name__ == "__main__":
    main()
