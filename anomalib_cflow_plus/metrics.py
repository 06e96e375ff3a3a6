"""Metrics per part type: each of anomalib's test metrics on one part type's images, as ``<name>/<type>``.

A :class:`~.data.MultiCategory` datamodule's batches say which part type each image is (``part_type (B,)``).
:func:`add_part_type_metrics` gives anomalib's :class:`~anomalib.metrics.Evaluator` a copy of each of its test metrics
per type, which sees only that type's images, so that ``engine.test`` reports e.g. ``image_AUROC/screw`` beside
``image_AUROC`` over all images.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.metrics.base import AnomalibMetric
from torchmetrics import Metric
from torchmetrics.wrappers.abstract import WrapperMetric

__all__ = ["PartTypeMetric", "add_part_type_metrics", "rows_of"]


def rows_of(batch: Batch, rows: torch.Tensor, fields: Sequence[str]) -> SimpleNamespace:
    """Pick the ``fields`` of the images where ``rows (B,)`` is true: tensors and lists indexed, ``None`` kept."""
    picked = {}
    for field in fields:
        value = getattr(batch, field, None)
        if isinstance(value, torch.Tensor):
            value = value[rows.to(value.device)]
        elif isinstance(value, list):
            value = [item for item, keep in zip(value, rows.tolist(), strict=True) if keep]
        picked[field] = value
    return SimpleNamespace(**picked)


class PartTypeMetric(WrapperMetric):
    """One anomalib metric on the images of one part type: named ``<metric name>/<type name>``.

    Args:
        metric (AnomalibMetric): The metric (e.g. ``AUROC(fields=["pred_score", "gt_label"], prefix="image_")``); a
            reset copy of it is kept.
        part_type (int): The type's index in the batches' ``part_type``.
        name (str): The type's name.

    """

    def __init__(self, metric: AnomalibMetric, part_type: int, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric = copy.deepcopy(metric)
        self.metric.reset()
        # Rebuilt from the datamodule at every setup: nothing of it goes into (or is expected from) a checkpoint.
        for module in self.metric.modules():
            if isinstance(module, Metric):
                module.persistent(False)
            module._non_persistent_buffers_set.update(module._buffers)
        self.part_type = part_type
        self.name = f"{metric.name}/{name}"
        self.fields = metric.fields

    def update(self, batch: Batch) -> None:  # type: ignore[override]
        """Update the metric with this type's images of ``batch``; a batch without part types or them is passed over."""
        part_type = getattr(batch, "part_type", None)
        rows = None if part_type is None else part_type.flatten() == self.part_type
        if rows is None or not bool(rows.any()):
            return
        self.metric.update(rows_of(batch, rows, self.fields))

    def compute(self) -> torch.Tensor | None:
        """Compute the metric over this type's images."""
        return self.metric.compute()

    def reset(self) -> None:
        """Reset the metric."""
        self.metric.reset()
        super().reset()


def add_part_type_metrics(evaluator: Evaluator, names: Sequence[str]) -> None:
    """Give ``evaluator`` a :class:`PartTypeMetric` of each of its test metrics for each part type in ``names``.

    Idempotent: the metrics of earlier calls are replaced, so that a new datamodule's types are the ones reported.
    """
    metrics = [metric for metric in evaluator.test_metrics if not isinstance(metric, PartTypeMetric)]
    per_type = [PartTypeMetric(metric, index, name) for index, name in enumerate(names) for metric in metrics]
    for metric in per_type:
        metric.compute_on_cpu = getattr(metric.metric, "compute_on_cpu", False)
    evaluator.test_metrics = torch.nn.ModuleList([*metrics, *per_type])
