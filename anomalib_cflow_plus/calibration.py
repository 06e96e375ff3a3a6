"""Calibration: per-layer constants fitted on the normal training images, so that scores are batch-independent.

The constants (each layer's maximum, mean and std of normal log-likelihoods) turn log-likelihood maps into
comparable per-layer scores (:class:`~.anomaly_map.AnomalyMapGenerator`). :class:`LayerStatistics` gathers them
batch by batch, :func:`calibrate` runs a model over the images, and :class:`CalibrationCallback` refits them
whenever the decoders have changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer

if TYPE_CHECKING:
    from .lightning_model import CflowPlus
    from .torch_model import CflowPlusModel


class LayerStatistics:
    """Streaming per-layer statistics of normal log-likelihoods: max, mean and std.

    Feed it ``update(log_likelihoods)`` batch by batch, then read the constants with :meth:`finalize`.
    It keeps running sums (``total``, ``total_sq``, ``count``) and the running ``maximum``, in float64.
    """

    def __init__(self, num_layers: int) -> None:
        self.maximum = torch.full((num_layers,), -torch.inf, dtype=torch.float64)
        self.total = torch.zeros(num_layers, dtype=torch.float64)
        self.total_sq = torch.zeros(num_layers, dtype=torch.float64)
        self.count = torch.zeros(num_layers, dtype=torch.float64)

    def update(self, log_likelihoods: Sequence[torch.Tensor]) -> None:
        """Add one batch: a sequence of L tensors of any shape (e.g. ``(B, h_l, w_l)``)."""
        for layer, values in enumerate(log_likelihoods):
            values = values.detach().double().flatten().cpu()
            self.maximum[layer] = torch.maximum(self.maximum[layer], values.max())
            self.total[layer] += values.sum()
            self.total_sq[layer] += values.pow(2).sum()
            self.count[layer] += values.numel()

    def merge(self, reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        """Merge the statistics of several processes in place: ``reduce(tensor, "max" | "sum")`` across them.

        E.g. Lightning's ``trainer.strategy.reduce(tensor, reduce_op=...)``.
        """
        for values, op in ((self.maximum, "max"), (self.total, "sum"), (self.total_sq, "sum"), (self.count, "sum")):
            values.copy_(reduce(values, op).cpu())

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(max, mean, std)``, each of shape ``(L,)`` in float32."""
        if bool((self.count == 0).any()):
            msg = "No log-likelihoods were collected for calibration; is the training set empty?"
            raise RuntimeError(msg)
        mean = self.total / self.count
        variance = (self.total_sq / self.count - mean.pow(2)).clamp_min(1e-12)
        return self.maximum.float(), mean.float(), variance.sqrt().float()


def calibrate(
    model: CflowPlusModel,
    images: Iterable[torch.Tensor],
    device: torch.device,
    merge: Callable[[LayerStatistics], None] | None = None,
) -> None:
    """Fit ``model``'s calibration constants on batches of pre-processed normal images ``(B, 3, H, W)``.

    ``merge`` combines the statistics of several processes in place (each saw its own shard), before they
    are final.
    """
    statistics = LayerStatistics(len(model.layers))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in images:
            statistics.update(model.log_likelihood_maps(model.encode(batch.to(device))))
    model.train(was_training)
    if merge is not None:
        merge(statistics)
    model.anomaly_map.set_calibration(*statistics.finalize())


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

    def on_save_checkpoint(self, trainer: Trainer, pl_module: CflowPlus, checkpoint: dict[str, Any]) -> None:
        """Calibrate a checkpoint taken after training batches that no validation followed.

        E.g. with ``limit_val_batches=0`` or no validation split: the checkpoint of the epoch's end would
        otherwise hold the previous (or no) calibration, and a model loaded from it would refuse to score.
        """
        if not self.stale:
            return
        self._calibrate_if_stale(trainer, pl_module)
        state = checkpoint.get("state_dict", {})
        for name, value in pl_module.model.anomaly_map.state_dict().items():
            key = f"model.anomaly_map.{name}"
            if key in state:
                state[key] = value.detach().clone()

    def _calibrate_if_stale(self, trainer: Trainer, pl_module: CflowPlus) -> None:
        if self.stale:
            pl_module.calibrate(training_images(trainer, pl_module))
            self.stale = False
