"""Lightning callbacks of CflowPlus."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer

if TYPE_CHECKING:
    from .lightning_model import CflowPlus


def training_images(trainer: Trainer, pl_module: LightningModule) -> Iterator[torch.Tensor]:
    """Batches ``(B, 3, H, W)`` of the trainer's training dataloader, pre-processed as in training."""
    pre_processor = getattr(pl_module, "pre_processor", None)
    transform = pre_processor.transform if isinstance(pre_processor, PreProcessor) else None
    for batch in trainer.train_dataloader:
        yield transform(batch.image) if transform is not None else batch.image


class CalibrationCallback(Callback):
    """Refit the calibration constants on the training images whenever the decoders have changed.

    It runs before each validation epoch, so that validation (and the thresholds anomalib's
    post-processor learns from it) sees the current decoders, and at the end of fitting, in case
    the last training batches were not followed by validation.
    """

    def __init__(self) -> None:
        self.stale = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Mark the calibration stale: the decoders moved."""
        del trainer, pl_module, args
        self.stale = True

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: CflowPlus) -> None:
        """Calibrate before validation if training changed the decoders."""
        self._calibrate_if_stale(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: CflowPlus) -> None:
        """Calibrate after the last training batches if validation did not follow them."""
        self._calibrate_if_stale(trainer, pl_module)

    def _calibrate_if_stale(self, trainer: Trainer, pl_module: CflowPlus) -> None:
        if self.stale:
            pl_module.calibrate(training_images(trainer, pl_module))
            self.stale = False


class EpochSeedCallback(Callback):
    """Reseed the global random state per epoch of a seeded run: a resumed run then matches an uninterrupted one.

    The training dataloader shuffles with the global random state when its iterator is created.
    Lightning creates it after ``on_train_epoch_start``, except for the first epoch of a fit,
    whose iterator comes before that hook; so the seed of epoch ``e`` (``seed + e``) is set at
    the start of each epoch and also at the start of a fit, at the epoch that fit begins with,
    which a resumed fit reads from this callback's checkpointed state. The fiber sub-batches
    use their own generator (:meth:`CflowPlus._fiber_generator`). Checkpoints taken mid-epoch
    resume that epoch with a reshuffled order. Inactive unless ``seed_everything`` set a seed.
    """

    def __init__(self) -> None:
        self.next_epoch = 0

    @staticmethod
    def _reseed(epoch: int) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            torch.manual_seed(int(seed) + epoch)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Seed the first epoch of this fit: 0, or the epoch a resumed fit continues with."""
        del trainer, pl_module
        self._reseed(self.next_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Seed the epoch."""
        del pl_module
        self._reseed(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember where a fit resumed from a checkpoint taken from now on continues."""
        del pl_module
        self.next_epoch = trainer.current_epoch + 1

    def state_dict(self) -> dict[str, int]:
        """Checkpointed state: the epoch a resumed fit begins with."""
        return {"next_epoch": self.next_epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore the epoch a resumed fit begins with."""
        self.next_epoch = int(state_dict["next_epoch"])
