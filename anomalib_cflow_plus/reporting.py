"""Training report: the training-loss curve and the test-score histogram, saved with a run's results.

:class:`TrainingReportCallback` writes, next to anomalib's visualizer images
(``<trainer.default_root_dir>/images``), a ``report/`` folder with

- ``training_loss.png`` and ``.json``: the loss of every training batch and its batch-size-weighted
  mean per epoch, written when training ends;
- ``image_scores.png`` and ``.json``: a histogram of the test images' scores, normal against
  anomalous, with the image threshold, written when testing ends; one panel per part type when the datamodule
  has several (:class:`~.data.MultiCategory`).

The plots are drawn on matplotlib ``Figure`` objects (Agg), so no pyplot state or backend changes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "LOSS_FILE_STEM",
    "SCORES_FILE_STEM",
    "BatchLoss",
    "EpochLoss",
    "ScoredImage",
    "TrainingReportCallback",
    "batch_image_scores",
    "batch_loss_value",
    "batch_size_of",
    "epoch_losses",
    "gather_from_all_ranks",
    "image_threshold",
    "plot_score_histogram",
    "plot_training_loss",
    "unique_images",
    "write_json",
]

logger = logging.getLogger(__name__)

LOSS_FILE_STEM = "training_loss"
SCORES_FILE_STEM = "image_scores"


class BatchLoss(TypedDict):
    """The training loss of one batch."""

    batch: int  # 1-based count of training batches, across epochs
    epoch: int
    loss: float
    batch_size: int


class EpochLoss(TypedDict):
    """The batch-size-weighted mean training loss of one epoch (what Lightning logs as ``*_epoch``)."""

    epoch: int
    loss: float
    first_batch: int
    last_batch: int


class ScoredImage(TypedDict):
    """The score of one test image, its ground-truth label and part type (``None`` when the data has none).

    ``part_type`` is the batch's index while testing, the type's name in the report.
    """

    image_path: str | None
    gt_label: int | None
    pred_score: float
    part_type: int | str | None


# ------------------------------------------------------------------------------------------- numbers
def epoch_losses(history: Sequence[BatchLoss]) -> list[EpochLoss]:
    """Batch-size-weighted mean loss per epoch, in epoch order."""
    totals: dict[int, list[float]] = {}
    for record in history:
        total = totals.setdefault(record["epoch"], [0.0, 0.0, math.inf, -math.inf])
        total[0] += record["loss"] * record["batch_size"]
        total[1] += record["batch_size"]
        total[2] = min(total[2], record["batch"])
        total[3] = max(total[3], record["batch"])
    return [
        EpochLoss(epoch=epoch, loss=weighted / count, first_batch=int(first), last_batch=int(last))
        for epoch, (weighted, count, first, last) in sorted(totals.items())
    ]


def batch_loss_value(outputs: Any, trainer: Trainer) -> float | None:
    """Return the loss of the batch that just trained: ``training_step``'s ``{"loss": ...}``, else ``train_loss``."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, torch.Tensor):
        metrics = trainer.callback_metrics
        loss = metrics.get("train_loss_step", metrics.get("train_loss"))
    return float(loss.detach()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def batch_size_of(batch: Any) -> int:
    """Return the number of images in an anomalib ``Batch``, a tensor ``(B, ...)`` or a sequence starting with one."""
    if isinstance(getattr(batch, "batch_size", None), int):
        return batch.batch_size
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.ndim > 0 else 1


def batch_image_scores(batch: Any) -> list[ScoredImage]:
    """Score, label and path of every image in an anomalib batch (``pred_score (B,)``, ``gt_label (B,)``)."""
    scores = getattr(batch, "pred_score", None)
    if scores is None:
        return []
    scores = scores.detach().float().reshape(-1).cpu().tolist()
    labels = getattr(batch, "gt_label", None)
    labels = [None] * len(scores) if labels is None else [int(label) for label in labels.reshape(-1).cpu().tolist()]
    paths = getattr(batch, "image_path", None) or [None] * len(scores)
    types = getattr(batch, "part_type", None)
    types = [None] * len(scores) if types is None else [int(index) for index in types.reshape(-1).cpu().tolist()]
    return [
        ScoredImage(image_path=None if path is None else str(path), gt_label=label, pred_score=score, part_type=kind)
        for path, label, score, kind in zip(paths, labels, scores, types, strict=True)
    ]


def image_threshold(pl_module: LightningModule) -> tuple[float | None, str]:
    """Return the image threshold on the scale of the scores anomalib reports, and that scale's name.

    With anomalib's post-processor normalizing, scores are normalized and the threshold is
    ``1 - image_sensitivity`` (0.5 by default); without normalization it is the raw threshold
    learned on validation. ``None`` when no threshold is known.
    """
    post_processor = getattr(pl_module, "post_processor", None)
    if not isinstance(post_processor, PostProcessor):
        return None, "raw"
    if post_processor.enable_normalization:
        threshold, scale = post_processor.normalized_image_threshold, "normalized"
    else:
        threshold, scale = post_processor.image_threshold, "raw"
    value = float(threshold)
    return (value if post_processor.enable_thresholding and math.isfinite(value) else None), scale


def gather_from_all_ranks(records: list[Any]) -> list[Any]:
    """Return the records of every process, rank 0's first; the records themselves without distributed training."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    gathered: list[list[Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)  # Lightning's all_gather takes tensors only
    return [record for rank_records in gathered for record in rank_records or []]


def unique_images(scores: list[ScoredImage]) -> list[ScoredImage]:
    """Drop repeated images (a distributed sampler pads ranks with repeats); images without a path are kept."""
    seen: set[str] = set()
    unique = []
    for score in scores:
        path = score["image_path"]
        if path is not None:
            if path in seen:
                continue
            seen.add(path)
        unique.append(score)
    return unique


# ------------------------------------------------------------------------------------------- plots
def plot_training_loss(history: Sequence[BatchLoss], path: Path) -> Path:
    """Write the per-batch loss and the per-epoch mean (at the epoch's middle batch) as a PNG."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    axes.plot(
        [r["batch"] for r in history], [r["loss"] for r in history], lw=1, alpha=0.6, color="tab:blue", label="batch"
    )
    epochs = epoch_losses(history)
    middles = [(e["first_batch"] + e["last_batch"]) / 2 for e in epochs]
    axes.plot(middles, [e["loss"] for e in epochs], "o-", color="tab:orange", label="epoch mean (at mid-epoch)")
    axes.set(xlabel="training batch", ylabel="loss", title="Training loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)
    return path


def plot_score_histogram(scores: Sequence[ScoredImage], threshold: float | None, scale: str, path: Path) -> Path:
    """Write a histogram of the image scores, normal against anomalous, with the threshold, as a PNG.

    Images of several part types get one panel per type, on one score axis.
    """
    types = sorted({s.get("part_type") for s in scores}, key=str)
    figure = Figure(figsize=(7, 1 + 3 * len(types)), layout="constrained")
    panels = figure.subplots(len(types), 1, sharex=True, squeeze=False)[:, 0]
    values = np.array([s["pred_score"] for s in scores], dtype=float)
    finite = values[np.isfinite(values)]
    bins = np.histogram_bin_edges(finite, bins=min(30, max(5, len(finite) // 2))) if finite.size else 10
    for axes, kind in zip(panels, types, strict=True):
        for label, name, color in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
            group = [
                s["pred_score"]
                for s in scores
                if s["gt_label"] == label and s.get("part_type") == kind and math.isfinite(s["pred_score"])
            ]
            axes.hist(group, bins=bins, alpha=0.6, color=color, label=f"{name} ({len(group)})")
        if threshold is not None:
            axes.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3g}")
        title = "Test image scores" if kind is None else f"Test image scores: {kind}"
        axes.set(ylabel="images", title=title)
        axes.legend()
    panels[-1].set(xlabel=f"image score ({scale})")
    figure.savefig(path, dpi=100)
    return path


def write_json(data: Any, path: Path) -> Path:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------- callback
class TrainingReportCallback(Callback):
    """Save a training-loss plot and a test-score histogram with the run's results.

    Files go to ``output_dir``, by default ``<trainer.default_root_dir>/report`` (anomalib's
    visualizer writes to ``<trainer.default_root_dir>/images``; under the Engine and the CLI that is
    e.g. ``results/CflowPlus/MVTecAD/brick/v0``). The loss history is kept in checkpoints, so
    testing from a checkpoint in a new process writes the loss plot too.

    Scores are read once every callback has handled a test batch: they are the post-processed
    scores that anomalib evaluates and draws, whatever the order of the callbacks.

    Under distributed training, scores are gathered from all processes and only rank 0 writes;
    the loss curve is rank 0's (the loss of its share of each batch).

    Args:
        output_dir: Folder for the report; ``None`` for ``<trainer.default_root_dir>/report``.

    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.loss_history: list[BatchLoss] = []
        self.image_scores: list[ScoredImage] = []
        self._unread_batch: Any = None

    def report_dir(self, trainer: Trainer) -> Path:
        """Return the folder the report goes to."""
        return self.output_dir if self.output_dir is not None else Path(trainer.default_root_dir) / "report"

    # -- state kept in checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Return the loss history (plain numbers, loadable with ``weights_only``)."""
        return {"loss_history": [dict(record) for record in self.loss_history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the loss history."""
        self.loss_history = [BatchLoss(**record) for record in state_dict.get("loss_history", [])]

    # -- training
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Start a new loss history for a new fit (a resumed fit restores it from the checkpoint afterwards)."""
        del trainer, pl_module
        if stage == "fit":
            self.loss_history = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record the batch's loss."""
        del pl_module, batch_idx
        loss = batch_loss_value(outputs, trainer)
        if loss is not None:
            self.loss_history.append(
                BatchLoss(
                    batch=len(self.loss_history) + 1,
                    epoch=trainer.current_epoch,
                    loss=loss,
                    batch_size=batch_size_of(batch),
                )
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the loss plot and numbers."""
        del pl_module
        if trainer.is_global_zero:
            self.write_loss_report(trainer)

    # -- testing
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a new set of scores."""
        del trainer, pl_module
        self.image_scores = []
        self._unread_batch = None

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any, **kwargs: Any
    ) -> None:
        """Hold the batch until every callback, the post-processor included, has handled it."""
        del trainer, pl_module, args, kwargs
        self._read_unread_batch()
        self._unread_batch = outputs if outputs is not None else batch

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        """Read the scores of the previous batch, now post-processed."""
        del args, kwargs
        self._read_unread_batch()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gather the scores of all processes; rank 0 writes the histogram (and the loss plot if it has a history)."""
        self._read_unread_batch()
        self.image_scores = unique_images(gather_from_all_ranks(self.image_scores))
        if trainer.is_global_zero:
            self.write_score_report(trainer, pl_module)
            if self.loss_history:
                self.write_loss_report(trainer)

    def _read_unread_batch(self) -> None:
        if self._unread_batch is not None:
            self.image_scores.extend(batch_image_scores(self._unread_batch))
            self._unread_batch = None

    # -- files
    def write_loss_report(self, trainer: Trainer) -> Path | None:
        """Write ``training_loss.png`` and ``.json``; ``None`` without a loss history."""
        if not self.loss_history:
            return None
        folder = self.report_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        numbers = {"batches": self.loss_history, "epochs": epoch_losses(self.loss_history)}
        write_json(numbers, folder / f"{LOSS_FILE_STEM}.json")
        path = plot_training_loss(self.loss_history, folder / f"{LOSS_FILE_STEM}.png")
        logger.info("Training loss plot written to %s.", path)
        return path

    def write_score_report(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Write ``image_scores.png`` and ``.json``; ``None`` without scores."""
        if not self.image_scores:
            return None
        folder = self.report_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        threshold, scale = image_threshold(pl_module)
        names = getattr(getattr(trainer, "datamodule", None), "part_types", None)
        if names:  # the batches' type indices -> the datamodule's names
            for record in self.image_scores:
                if isinstance(record.get("part_type"), int):
                    record["part_type"] = names[record["part_type"]]
        numbers = {"score_scale": scale, "image_threshold": threshold, "images": self.image_scores}
        write_json(numbers, folder / f"{SCORES_FILE_STEM}.json")
        path = plot_score_histogram(self.image_scores, threshold, scale, folder / f"{SCORES_FILE_STEM}.png")
        logger.info("Image score histogram written to %s.", path)
        return path
