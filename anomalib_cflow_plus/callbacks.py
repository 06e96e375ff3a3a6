"""Lightning callbacks of CflowPlus."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer

from .seeding import global_seed

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

    The training dataloader's sampler draws its shuffling from the global random state when the
    epoch's first batch is fetched, after ``on_train_epoch_start``, where the state is set to
    ``seed + epoch``. Creating the epoch's iterator draws one more number (torch's base seed for
    the loader); Lightning creates it after this hook for later epochs, but before it for the
    first epoch of a fit, fresh or resumed, so that draw is repeated here then. The fiber
    sub-batches use their own generator (:meth:`CflowPlus._fiber_generator`). Inactive unless
    ``seed_everything`` set a seed. A checkpoint taken mid-epoch resumes with another order.
    """

    def __init__(self) -> None:
        self.first_epoch_of_fit = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Note that a fit, fresh or resumed, starts: its first epoch's iterator exists already."""
        del trainer, pl_module
        self.first_epoch_of_fit = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Seed the epoch, as if its dataloader iterator were created after this hook."""
        del pl_module
        seed = global_seed()
        if seed is None:
            return
        torch.manual_seed(seed + trainer.current_epoch)
        if self.first_epoch_of_fit:
            torch.empty((), dtype=torch.int64).random_()  # the draw the iterator's creation makes
        self.first_epoch_of_fit = False
