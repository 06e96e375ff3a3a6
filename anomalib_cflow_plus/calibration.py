"""Calibration: per-layer constants fitted on the normal training images, so that scores are batch-independent.

The constants (each layer's maximum, mean and std of normal log-likelihoods, and, where the part needs them, each
position's mean and std) turn log-likelihood maps into comparable per-layer scores
(:class:`~.anomaly_map.AnomalyMapGenerator`). :class:`LayerStatistics` gathers them batch by batch, :func:`calibrate`
runs a model over the images, and :class:`CalibrationCallback` refits them whenever the decoders have changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.nn import functional as F  # noqa: N812

from .training import Reduce, process_reduce

if TYPE_CHECKING:
    from .torch_model import CflowPlusModel

__all__ = [
    "PEAK_CONCENTRATION_THRESHOLD",
    "PEAK_MIN_IMAGES",
    "POSITION_STD_FLOOR",
    "CalibrationCallback",
    "LayerStatistics",
    "calibrate",
    "peak_window_radius",
    "training_images",
]


# "auto" position-calibrates the image score when, in every layer, at least this share of the good training images
# is least likely in one small window of the grid: most good images would score by that one place.
PEAK_CONCENTRATION_THRESHOLD = 0.5
# ... and only from at least this many good training images. With a few images one window always holds a large share
# of their peaks (with two, one of two is half), and per-position statistics of so few images are noise.
PEAK_MIN_IMAGES = 16
# Per-position standard deviations are floored at this fraction of the layer's median one (a position whose
# normal fibers hardly vary must not turn a small change into a large z-score).
POSITION_STD_FLOOR = 0.5


def peak_window_radius(height: int, width: int) -> int:
    """Half-side ``r`` of the ``(2r + 1)``-square window in which good images' least likely positions are counted."""
    return max(1, min(height, width) // 16)


class LayerStatistics:
    """Streaming statistics of normal log-likelihoods, per layer and per position of its grid.

    Feed it ``update(log_likelihoods)`` batch by batch, then read the constants with :meth:`finalize`. Per layer
    and position it keeps, over images, the running maximum, sum and sum of squares (float64), and how many images
    were least likely there (``peaks``); and the number of images per layer. Every figure merges across processes by
    a max or a sum (:meth:`merge`).
    """

    def __init__(self, num_layers: int) -> None:
        self.maximum: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.total: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.total_sq: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.peaks: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.count = torch.zeros(num_layers, dtype=torch.float64)

    def update(self, log_likelihoods: Sequence[torch.Tensor]) -> None:
        """Add one batch: L tensors ``(B, *grid)``, e.g. ``(B, h_l, w_l)``; every batch of a layer has one grid.

        Raises:
            ValueError: When a layer's grid differs from that of its earlier batches.

        """
        for layer, values in enumerate(log_likelihoods):
            values = values.detach().double().cpu()
            grid = values.shape[1:]
            if self.count[layer] == 0:
                self.start(layer, grid)
            elif grid != self.total[layer].shape:
                msg = (
                    f"Calibration images must share one size: layer {layer} had a grid of "
                    f"{tuple(self.total[layer].shape)}, then {tuple(grid)}. Resize them in the pre-processor."
                )
                raise ValueError(msg)
            self.maximum[layer] = torch.maximum(self.maximum[layer], values.amax(dim=0))
            self.total[layer] += values.sum(dim=0)
            self.total_sq[layer] += values.pow(2).sum(dim=0)
            least_likely = values.flatten(start_dim=1).argmin(dim=1)
            self.peaks[layer].view(-1).index_add_(0, least_likely, torch.ones(len(values), dtype=torch.float64))
            self.count[layer] += len(values)

    def start(self, layer: int, grid: Sequence[int]) -> None:
        """Start a layer's figures, of no image yet, on its ``grid`` (e.g. ``(h_l, w_l)``)."""
        self.maximum[layer] = torch.full(tuple(grid), -torch.inf, dtype=torch.float64)
        self.total[layer] = torch.zeros(tuple(grid), dtype=torch.float64)
        self.total_sq[layer] = torch.zeros(tuple(grid), dtype=torch.float64)
        self.peaks[layer] = torch.zeros(tuple(grid), dtype=torch.float64)

    def merge(self, reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        """Merge the statistics of several processes in place: ``reduce(tensor, "max" | "sum")`` across them.

        E.g. Lightning's ``trainer.strategy.reduce(tensor, reduce_op=...)``. Every process must have seen images, or
        at least have :meth:`start`-ed every layer on its grid (a process without images of one part type).
        """
        if any(tensor.numel() == 0 for tensor in self.total):
            self._require_data()
        for tensors, op in ((self.maximum, "max"), (self.total, "sum"), (self.total_sq, "sum"), (self.peaks, "sum")):
            for tensor in tensors:
                tensor.copy_(reduce(tensor, op).cpu())
        self.count.copy_(reduce(self.count, "sum").cpu())

    def peak_concentration(self) -> list[float]:
        """Per layer, the largest share of images whose least likely position lies in one ``(2r+1)``-square window.

        Near 1 when good images peak at one place (an aligned part with a region whose look varies); near the
        window's share of the grid when their peaks are spread (moving parts, textures).
        """
        self._require_data()
        shares = []
        for peaks, count in zip(self.peaks, self.count, strict=True):
            grid = peaks.reshape(1, 1, *peaks.shape[-2:]) if peaks.dim() >= 2 else peaks.reshape(1, 1, 1, -1)
            side = 2 * peak_window_radius(*grid.shape[-2:]) + 1
            windows = F.avg_pool2d(grid, side, stride=1, padding=side // 2, count_include_pad=True) * side**2
            shares.append(float(windows.max() / count))
        return shares

    def finalize(
        self, image_calibration: str = "layer"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Return ``(max, mean, std)``, each ``(L,)`` in float32, and the per-position statistics or ``None``.

        ``image_calibration``: ``"layer"`` returns no position statistics; ``"position"`` returns each layer's
        per-position ``(mean, std)``, ``(h_l, w_l)`` in float32, the std floored at :data:`POSITION_STD_FLOOR` times
        its median; ``"auto"`` does so only when :meth:`peak_concentration` reaches
        :data:`PEAK_CONCENTRATION_THRESHOLD` in every layer, over at least :data:`PEAK_MIN_IMAGES` images.

        Raises:
            RuntimeError: When no batch was added.

        """
        self._require_data()
        if image_calibration == "auto":
            enough = float(self.count.min()) >= PEAK_MIN_IMAGES
            concentrated = enough and min(self.peak_concentration()) >= PEAK_CONCENTRATION_THRESHOLD
            image_calibration = "position" if concentrated else "layer"
        maxima, means, stds, positions = [], [], [], []
        for total, total_sq, maximum, count in zip(self.total, self.total_sq, self.maximum, self.count, strict=True):
            fibers = count * total.numel()
            mean = total.sum() / fibers
            maxima.append(maximum.max())
            means.append(mean)
            stds.append((total_sq.sum() / fibers - mean.pow(2)).clamp_min(1e-12).sqrt())
            if image_calibration == "position":
                position_mean = total / count
                position_std = (total_sq / count - position_mean.pow(2)).clamp_min(1e-12).sqrt()
                position_std = position_std.clamp_min(POSITION_STD_FLOOR * float(position_std.median()))
                positions.append((position_mean.float(), position_std.float()))
        constants = torch.stack(maxima).float(), torch.stack(means).float(), torch.stack(stds).float()
        return *constants, (positions or None)

    def _require_data(self) -> None:
        if bool((self.count == 0).any()):
            msg = "No log-likelihoods were collected for calibration; is the training set empty?"
            raise RuntimeError(msg)


def calibrate(
    model: CflowPlusModel,
    images: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    reduce: Reduce | None = None,
) -> None:
    """Fit ``model``'s calibration constants on batches of pre-processed normal images ``(B, 3, H, W)``.

    A model of several part types takes ``(images, part_type (B,))`` pairs: it fits each type's constants on that
    type's images (:meth:`~.anomaly_map.AnomalyMapGenerator.set_part_type_calibration`), each type's prototype
    (:class:`~.part_types.PartTypeRecognizer`), then each type's score standardization on the same images' scores.
    ``reduce`` merges the figures of several processes (each saw its own shard) before they are final.
    """
    typed = model.part_types.count
    statistics = [LayerStatistics(len(model.layers)) for _ in range(max(typed, 1))]
    descriptor_sums = torch.zeros(typed, model.part_types.prototypes.shape[1], dtype=torch.float64) if typed else None
    kept: list[tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]] = []  # for the standardization
    descriptors_kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # for each type's distance range
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in images:
            batch_images, part_type = batch if isinstance(batch, tuple) else (batch, None)
            if not typed:
                statistics[0].update(model.image_log_likelihood_maps(batch_images.to(device)))
                continue
            if part_type is None:
                msg = "A model of several part types calibrates on (images, part_type) pairs: each image's type."
                raise ValueError(msg)
            maps, part_type, descriptors = model.evidence(batch_images.to(device), part_type)
            part_type = part_type.cpu()
            for index in part_type.unique().tolist():
                statistics[index].update([layer_map[part_type == index] for layer_map in maps])
            descriptor_sums.index_add_(0, part_type, descriptors.double().cpu())
            kept.append(([layer_map.cpu() for layer_map in maps], part_type, tuple(batch_images.shape[-2:])))
            descriptors_kept.append((descriptors.cpu(), part_type))
        if reduce is not None:
            grids = next((s.total for s in statistics if bool((s.count > 0).all())), [])
            for type_statistics in statistics:  # a process may have no image of some type: it adds nothing
                for layer, grid in enumerate(grids):
                    if type_statistics.count[layer] == 0:
                        type_statistics.start(layer, grid.shape)
                type_statistics.merge(reduce)
        if not typed:
            model.anomaly_map.set_calibration(*statistics[0].finalize(model.image_calibration))
        else:
            missing = [name for name, s in zip(model.part_types.names, statistics, strict=True) if s.count.min() == 0]
            if missing:
                msg = f"No good training image of the part types {missing} reached calibration, on any process."
                raise RuntimeError(msg)
            model.anomaly_map.set_part_type_calibration([s.finalize(model.image_calibration) for s in statistics])
            if reduce is not None:
                descriptor_sums = reduce(descriptor_sums, "sum").cpu()
            model.part_types.set_prototypes(descriptor_sums)
            distance_range(model, descriptors_kept, reduce)
            standardize(model, kept, device, reduce)
    model.train(was_training)


def distance_range(
    model: CflowPlusModel, kept: Iterable[tuple[torch.Tensor, torch.Tensor]], reduce: Reduce | None = None
) -> None:
    """Fit each part type's range of training-image distances to its prototype: the largest, and their std.

    ``kept``: per batch, descriptors ``(B, D)`` and part types ``(B,)``.
    """
    count = model.part_types.count
    maximum = torch.zeros(count, dtype=torch.float64)
    moments = torch.zeros(count, 3, dtype=torch.float64)
    for descriptors, part_type in kept:
        distance = model.part_types.distance(descriptors.to(model.part_types.prototypes), part_type).double().cpu()
        maximum.scatter_reduce_(0, part_type, distance, reduce="amax")
        rows = torch.stack([torch.ones_like(distance), distance, distance.pow(2)], dim=1)
        moments.index_add_(0, part_type, rows)
    if reduce is not None:
        maximum, moments = reduce(maximum, "max").cpu(), reduce(moments, "sum").cpu()
    mean = moments[:, 1] / moments[:, 0].clamp_min(1)
    std = (moments[:, 2] / moments[:, 0].clamp_min(1) - mean.pow(2)).clamp_min(0).sqrt()
    model.part_types.set_distance_range(maximum.float(), std.float())


def standardize(
    model: CflowPlusModel,
    kept: Iterable[tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]],
    device: torch.device,
    reduce: Reduce | None = None,
) -> None:
    """Fit each part type's score and map standardization on its good images' log-likelihood maps.

    ``kept``: per batch, L maps ``(B, h_l, w_l)``, the part types ``(B,)`` and the image size ``(H, W)``; the maps are
    scored with the model's fresh constants, and each type's scores and maps' maxima give their mean and std.
    """
    moments = torch.zeros(model.part_types.count, 5, dtype=torch.float64)  # count, sum, sum of squares (score, map)
    for maps, part_type, image_size in kept:
        part_type = part_type.to(device)
        anomaly_map, score = model.anomaly_map([layer_map.to(device) for layer_map in maps], image_size, part_type)
        peak = anomaly_map.flatten(start_dim=1).amax(dim=1)
        rows = torch.stack([torch.ones_like(score), score, score.pow(2), peak, peak.pow(2)], dim=1)
        moments.index_add_(0, part_type.cpu(), rows.double().cpu())
    if reduce is not None:
        moments = reduce(moments, "sum").cpu()
    count = moments[:, 0].clamp_min(1)
    centers, spreads = [], []
    for column in (1, 3):
        mean = moments[:, column] / count
        std = (moments[:, column + 1] / count - mean.pow(2)).clamp_min(0).sqrt()
        centers.append(mean.float())
        spreads.append(std.clamp_min(1e-3 * mean.abs() + 1e-6).float())  # one image, or identical ones
    model.anomaly_map.set_standardization(centers[0], spreads[0], centers[1], spreads[1])


def training_images(
    trainer: Trainer, pl_module: LightningModule
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(B, 3, H, W)`` of the trainer's training dataloader, pre-processed as in training.

    Batches that carry part types (:class:`~.data.MultiCategory`) come as ``(images, part_type (B,))``.
    """
    pre_processor = getattr(pl_module, "pre_processor", None)
    transform = pre_processor.transform if isinstance(pre_processor, PreProcessor) else None
    for batch in trainer.train_dataloader:
        images = transform(batch.image) if transform is not None else batch.image
        part_type = getattr(batch, "part_type", None)
        yield images if part_type is None else (images, part_type)


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

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate before validation if training changed the decoders."""
        self._calibrate_if_stale(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate after the last training batches if validation did not follow them."""
        self._calibrate_if_stale(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Calibrate a checkpoint taken after training batches that no validation followed.

        E.g. with ``limit_val_batches=0`` or no validation split: the checkpoint of the epoch's end would
        otherwise hold the previous (or no) calibration, and a model loaded from it would refuse to score.
        """
        if not self.stale:
            return
        self._calibrate_if_stale(trainer, pl_module)
        state = checkpoint.get("state_dict", {})
        for module in ("anomaly_map", "part_types"):
            for name, value in getattr(pl_module.model, module).state_dict().items():
                key = f"model.{module}.{name}"
                if key in state:
                    state[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value

    def _calibrate_if_stale(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate ``pl_module.model`` on the training images; with several processes, each calibrates its shard.

        The statistics are then merged across processes, so that every process holds the same constants.
        """
        if not self.stale:
            return
        calibrate(pl_module.model, training_images(trainer, pl_module), pl_module.device, process_reduce(trainer))
        self.stale = False
