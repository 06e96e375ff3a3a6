"""Helpers shared by the tests (importable by the CLI too, with the repository root on ``PYTHONPATH``)."""

from __future__ import annotations

from lightning.pytorch import Callback


class SimulatedCrashError(RuntimeError):
    """Stands for a crash or a kill in the middle of training."""


class InterruptAtEpoch(Callback):
    """Raise at the start of ``epoch``, after the previous epoch's checkpoint has been written."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        del pl_module
        if trainer.current_epoch == self.epoch:
            raise SimulatedCrashError
