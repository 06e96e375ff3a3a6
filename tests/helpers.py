"""Helpers shared by the tests (importable by the CLI too, with the repository root on ``PYTHONPATH``)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback

TINY = {"image_size": 128, "n_train": 16, "n_test_good": 6, "n_test_defect": 3}
TINY_CATEGORY = "brick"


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


def tiny_datamodule(root: Path):
    """anomalib's own MVTecAD datamodule over the tiny dataset."""
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category=TINY_CATEGORY, train_batch_size=8, eval_batch_size=8, num_workers=0)
