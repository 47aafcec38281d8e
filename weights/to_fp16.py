"""Ship a run's model: rewrite a capcli model file with fp16 weights (half the size, same outputs).

    python weights/to_fp16.py RUN_DIR/best.safetensors weights/NAME.safetensors
"""

import sys

import torch

from capcli.model import files as model_files

source, target = sys.argv[1], sys.argv[2]
loaded = model_files.load_model(source)
model_files.save_model(target, loaded.model, loaded.vocab, encoder_weights=loaded.metadata["encoder_weights"],
                      training=loaded.training, dtype=torch.float16)
print(target)
