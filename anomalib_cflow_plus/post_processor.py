"""CflowPlus's post-processor: anomalib's, with thresholds that can come from good images alone.

anomalib's :class:`~anomalib.post_processing.PostProcessor` learns its thresholds on the validation split by
maximizing F1. On a validation split of good images only, the usual case on a production line, F1 has no
defect to find: older anomalib versions put the threshold on the lowest score (anomalib #2433, #2669), and
anomalib 2.7 falls back to the highest good score, whose false-positive rate nobody chose.
:class:`CflowPlusPostProcessor` then takes each threshold as a quantile of the good images' scores instead, for a
target false-positive rate. The thresholds are buffers, as anomalib's are, so
checkpoints and exported graphs carry them, and ``pred_label``, ``pred_mask`` and the normalization
(threshold at 0.5) work in OpenVINO with no defective image ever seen.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .errors import ConfigurationError

__all__ = ["THRESHOLD_MODES", "CflowPlusPostProcessor", "NormalScores", "ThresholdMode"]

logger = logging.getLogger(__name__)

ThresholdMode = Literal["auto", "normal", "f1"]
THRESHOLD_MODES: tuple[str, ...] = ("auto", "normal", "f1")


class NormalScores(Metric):
    """Scores of a validation split's good images, and a count of its anomalous ones.

    States: image scores ``(N,)`` and maps' maxima ``(N,)`` of the good images, concatenated across processes
    under DDP, and the number of anomalous images, summed.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("map_maxima", default=[], dist_reduce_fx="cat")
        self.add_state("anomalous", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, batch: Batch) -> None:  # type: ignore[override]
        """Add a validation batch: ``pred_score (B,)``, ``anomaly_map (B, [1,] H, W)``, ``gt_label (B,)`` or ``None``.

        Without labels every image counts as good: a split of unlabelled images is one of good images.
        """
        scores = batch.pred_score.detach().flatten()
        good = torch.ones_like(scores, dtype=torch.bool)
        if batch.gt_label is not None:
            good = ~batch.gt_label.flatten().bool().to(scores.device)
            self.anomalous += int((~good).sum())
        self.scores.append(scores[good].float())
        if batch.anomaly_map is not None:
            self.map_maxima.append(batch.anomaly_map.detach().flatten(start_dim=1).amax(dim=1)[good].float())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return the good images' ``scores (N,)`` and ``map_maxima (N,)`` (empty without maps), and the defect count.

        Under DDP the states are synced for this call only (a list state is then one concatenated tensor), so
        everything that needs every process's images is read here.
        """
        return _concatenated(self.scores), _concatenated(self.map_maxima), int(self.anomalous)


def _concatenated(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Return a ``cat`` list state as one tensor ``(N,)``, empty when nothing was added."""
    if isinstance(state, torch.Tensor):
        return state.flatten()
    return dim_zero_cat(state) if state else torch.empty(0)


class CflowPlusPostProcessor(PostProcessor):
    """anomalib's post-processor, with a choice of how the thresholds are learned on the validation split.

    Args:
        threshold (str): ``"normal"``: from good images only, for a false-positive rate of ``normal_fpr``: the image
            threshold is the ``1 - normal_fpr`` quantile of the good validation images' scores, and the pixel
            threshold the same quantile of their maps' maxima, so that about ``normal_fpr`` of good images get
            any pixel flagged. Defective validation images, if any, are left out. ``"f1"``: anomalib's
            F1-adaptive thresholds, which need defective validation images (a warning says when there are
            none). ``"auto"`` (default): ``"f1"`` when the validation split holds defective images, otherwise
            ``"normal"``. Defaults to ``"auto"``.
        normal_fpr (float): Target false-positive rate of ``"normal"`` thresholds, in ``(0, 1)``. The quantile
            of ``N`` good images cannot resolve rates below about ``1 / N``. Defaults to ``0.01``.
        **kwargs: anomalib's :class:`~anomalib.post_processing.PostProcessor` arguments (normalization,
            sensitivities, ...).

    Raises:
        ConfigurationError: On an unknown ``threshold`` or a ``normal_fpr`` outside ``(0, 1)``.

    Example:
        >>> from anomalib_cflow_plus import CflowPlus, CflowPlusPostProcessor
        >>> model = CflowPlus(post_processor=CflowPlusPostProcessor(threshold="normal", normal_fpr=0.05))
        >>> model.post_processor.threshold, model.post_processor.normal_fpr
        ('normal', 0.05)

    """

    def __init__(self, threshold: ThresholdMode = "auto", normal_fpr: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if threshold not in THRESHOLD_MODES:
            msg = f"threshold must be one of {THRESHOLD_MODES}, got {threshold!r}."
            raise ConfigurationError(msg)
        if not 0.0 < normal_fpr < 1.0:
            msg = f"normal_fpr must lie in (0, 1), got {normal_fpr}."
            raise ConfigurationError(msg)
        self.threshold = threshold
        self.normal_fpr = normal_fpr
        self._normal_scores = NormalScores()

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        """Anomalib's min-max normalization around the threshold, in one pass over the pixels.

        anomalib's own computes the normal, the zero-range and the no-range results for every pixel and picks one
        with three ``where`` (in OpenVINO: 4 ``Greater``, 4 ``Select`` and 2 ``Less`` over each map, 1.5 ms per
        256-px image on a 2-core CPU). The pick depends on the scalars alone, so here the scalars pick the
        coefficients of ``clamp((preds - center) / scale + 0.5, low, high)``, one fused elementwise op:

        * a range: anomalib's arithmetic exactly, ``center`` the threshold (the mid-range when it is NaN), bounds 0, 1;
        * a zero range (``min == max``): anomalib's step, 1 above the threshold, 0 below, 0.5 on it, as a slope of
          ``1 / finfo.tiny``; only differences from the threshold below ``finfo.tiny / 2`` (1e-38) land in between;
        * no range (``min`` or ``max`` NaN, never normalized): the predictions, through ``(preds - 0.5) + 0.5``.
        """
        if preds is None:
            return preds
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        center = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        value_range = torch.where(value_range == 0, torch.finfo(preds.dtype).tiny, value_range)
        scale = torch.where(has_range, value_range, 1.0)
        center = torch.where(has_range, center, 0.5)
        low = torch.where(has_range, 0.0, -torch.inf)
        high = torch.where(has_range, 1.0, torch.inf)
        return torch.clamp((preds - center) / scale + 0.5, low, high)

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        """Keys of anomalib's post-processor, plus the threshold mode and the target false-positive rate."""
        return (*super()._checkpoint_config_keys, "threshold", "normal_fpr")

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Batch,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Update anomalib's threshold and normalization metrics, and collect the good images' scores."""
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        if self.enable_thresholding:
            self._normal_scores.update(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute anomalib's thresholds and normalization, then replace the thresholds by normal ones if due."""
        collected = self.enable_thresholding and self._normal_scores.update_called
        super().on_validation_epoch_end(trainer, pl_module)
        if not collected:
            return
        scores, map_maxima, anomalous = self._normal_scores.compute()
        self._normal_scores.reset()
        if self.threshold == "f1" or (self.threshold == "auto" and anomalous > 0):
            if anomalous == 0:
                logger.warning(
                    "The validation split holds no defective image, so anomalib's F1-adaptive threshold has nothing "
                    "to maximize: it falls back to the highest validation score, and its false-positive rate is "
                    "whatever the split's size makes it. Use threshold='normal' (or 'auto') to set it from good "
                    "images for a target false-positive rate."
                )
            return
        self.set_normal_thresholds(scores, map_maxima)

    @torch.no_grad()
    def set_normal_thresholds(self, scores: torch.Tensor, map_maxima: torch.Tensor) -> None:
        """Set the thresholds from good images: ``1 - normal_fpr`` quantiles of their scores and map maxima.

        Args:
            scores: Image scores of good images ``(N,)``.
            map_maxima: Their anomaly maps' maxima ``(N,)``; empty to leave the pixel threshold as it is.

        """
        if scores.numel() == 0:
            logger.warning("No good validation image was scored: the thresholds stay as anomalib computed them.")
            return
        quantile = 1.0 - self.normal_fpr
        self._image_threshold.copy_(torch.quantile(scores.double(), quantile).float())
        if map_maxima.numel():
            self._pixel_threshold.copy_(torch.quantile(map_maxima.double(), quantile).float())
        if scores.numel() * self.normal_fpr < 1:
            logger.warning(
                "Thresholds from %d good validation images: a false-positive rate of %s cannot be resolved below "
                "about 1/%d; hold out more good images for validation.",
                scores.numel(),
                self.normal_fpr,
                scores.numel(),
            )
        logger.info(
            "Thresholds from %d good validation images at a %.3g false-positive rate: image %.6g, pixel %.6g.",
            scores.numel(),
            self.normal_fpr,
            float(self._image_threshold),
            float(self._pixel_threshold),
        )
