"""Average the weights of several capcli model files of one run (checkpoint averaging).

    python weights/average_models.py OUT.safetensors A.safetensors B.safetensors ...

The files must be the same model (same config and vocabulary: epochs of one run); floating-point
weights are averaged, anything else (counters) taken from the last. The training record is the
last file's, with the averaged files listed under "averaged".
"""

import json
import sys

import torch

from capcli.model import files as model_files

target, sources = sys.argv[1], sys.argv[2:]
if not sources:
    sys.exit(__doc__)
models = [model_files.load_model(path) for path in sources]
last = models[-1]
for path, m in zip(sources, models):
    if m.model.cfg.to_dict() != last.model.cfg.to_dict() or m.vocab.words != last.vocab.words:
        sys.exit(f"{path}: not the same model as {sources[-1]} (config or vocabulary differs)")
states = [m.model.state_dict() for m in models]
averaged = {name: torch.stack([s[name].float() for s in states]).mean(0).to(t.dtype) if t.is_floating_point() else t
            for name, t in states[-1].items()}
last.model.load_state_dict(averaged)
training = {**last.training, "averaged": sources}
model_files.save_model(target, last.model, last.vocab, encoder_weights=last.metadata["encoder_weights"], training=training)
print(json.dumps({"written": target, "averaged": len(sources)}))
