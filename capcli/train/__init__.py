"""Training a model, one job per module:

- loop: the training loop (``Trainer``): epochs of steps, each validated, judged and saved
- setup: assembling a run (``Run``): settings, data, run folder, vocabulary, model, features, optimizer
- validation: the val loss and the scores of the val captions after an epoch
- schedule: the plateau count (learning-rate halving, early stop) and the switch to self-critical training
- checkpoints: best/last model files, the training state, metrics.jsonl and curves.png; read on --resume
- launch: ``train()`` a new run, ``resume()`` a stopped one, alone or under torchrun
- interrupted: the exception a stop signal ends a run with, and the command that continues it
- state: what a run changes besides the weights (optimizer, counters, history), saved for --resume
- objective: what a training objective is, and the module DistributedDataParallel wraps
- xe: the cross-entropy objective (teacher forcing)
- scst: the self-critical objective (REINFORCE with a CIDEr-D reward)
- losses: the teacher-forced cross-entropy loss with the attention penalty
- features: where a step's encoder features come from (the cache; the cache of the frozen part
  below the fine-tuned blocks, which then run at every step; or the whole encoder)
- feature_cache: the cache of the frozen encoder (or of its frozen lower part) in the run folder
- curves: the training curves drawn into a PNG
- config: a run's settings (``TrainConfig``), saved as config.json; imports no torch
"""
