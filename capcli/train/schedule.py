"""What happens between epochs besides validation: the plateau count that halves the learning rate
and stops the run early, and the switch from cross-entropy to self-critical training."""

from __future__ import annotations

import logging

import torch

from capcli.model import files as model_files
from capcli.runtime import distributed
from capcli.train.config import TrainConfig
from capcli.train.setup import Run
from capcli.train.state import TrainState

log = logging.getLogger("capcli")


def plateau_step(improved: bool, bad_epochs: int, lr_patience: int, patience: int) -> tuple[int, bool, bool]:
    """After an epoch: (bad epochs since the best, halve the learning rate now?, stop now?).

    One count decides both: the rate halves after every ``lr_patience`` epochs without a better
    score, and training stops after ``patience`` of them.
    """
    bad_epochs = 0 if improved else bad_epochs + 1
    halve = not improved and lr_patience > 0 and bad_epochs % lr_patience == 0
    return bad_epochs, halve, bad_epochs >= patience


def judge_epoch(state: TrainState, cfg: TrainConfig, epoch: int, score: float) -> tuple[bool, bool, bool, bool]:
    """The verdict on ``epoch`` from its ``score``: (improved, halve the learning rate now?, stop now?,
    switch to self-critical training now?). Counts the epoch in ``state``: its best score and epoch,
    and the epochs since."""
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch = score, epoch
    state.bad_epochs, halve, stop = plateau_step(improved, state.bad_epochs, cfg.lr_patience, cfg.patience)
    # The cross-entropy phase ends after --scst-after epochs, or earlier when it stops improving.
    switch = state.phase == "xe" and cfg.scst_after is not None and (epoch >= cfg.scst_after or stop)
    return improved, halve and not switch, stop, switch  # the switch brings a fresh optimizer: no halving


def halve_learning_rate(optimizer: torch.optim.Optimizer) -> None:
    """Halve the learning rate of every parameter group (the decoder's and the encoder's)."""
    for group in optimizer.param_groups:
        group["lr"] *= 0.5


def start_scst(run: Run, epoch: int, from_best: bool) -> None:
    """Switch to self-critical training: from the best cross-entropy weights (by val CIDEr), with
    a fresh optimizer at --scst-lr and a fresh count of epochs without gain. Called before the
    epoch's save, so that a resumed run continues from exactly this state."""
    if from_best:  # the best epoch is an earlier one: its weights are in best.safetensors
        def best_weights() -> None:
            run.model.load_state_dict(model_files.load_model(run.run_dir / "best.safetensors").model.state_dict())

        distributed.on_main(run.ctx, best_weights)
        distributed.broadcast_module(run.ctx, run.model)
    run.state.phase, run.state.bad_epochs = "scst", 0
    run.state.optimizer = run.new_optimizer("scst")
    log.info("self-critical training from epoch %d on (%d samples per image, baseline: %s), starting from the "
             "weights of epoch %d (%s %.4f), learning rate %g", epoch + 1, run.cfg.scst_samples,
             run.cfg.scst_baseline, run.state.best_epoch, run.selection[1], run.state.best_score, run.cfg.scst_lr)
