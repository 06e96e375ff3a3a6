"""From per-layer log-likelihood maps to a calibrated anomaly map and an image score.

Nothing here reduces across the batch: every image's map and score depend on that image and on
the calibration constants (buffers fitted on normal training fibers) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from anomalib.models.components.filters.blur import compute_kernel_size
from kornia.filters import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .errors import ConfigurationError

ScoreMode = Literal["paper", "zscore"]
SCORE_MODES: tuple[str, ...] = ("paper", "zscore")
ImageScore = Literal["combined", "map", "layer_max"]
IMAGE_SCORES: tuple[str, ...] = ("combined", "map", "layer_max")


class AnomalyMapGenerator(nn.Module):
    """Turn per-layer log-likelihood maps into an anomaly map ``(B, 1, H, W)`` and a score ``(B,)``.

    Score modes:
        * ``"paper"``: per layer ``p_l = exp(ll_l - max_l)``, where ``max_l`` is the largest
          log-likelihood seen on normal training fibers (the paper uses the test set's max, which
          couples images in a batch); the map is ``L - sum_l upsample(p_l)``.
        * ``"zscore"``: per layer ``(mean_l - ll_l) / std_l``, upsampled and averaged over layers.

    The map is smoothed with a Gaussian of ``sigma`` pixels (0 disables it): anomalib's kernel size and
    reflect border, applied as two 1-D passes (kornia's separable filter), so ``2k`` instead of ``k**2``
    multiply-adds per pixel for a ``k``-tap kernel (33 taps at sigma 4).
    Image scores:
        * ``"map"``: the mean of the top ``top_k_percent`` % of map pixels, or the map's max when it is 0.
        * ``"layer_max"``: per layer, the most anomalous position's normalized score, averaged over layers.
          Every layer then weighs the same in the image score, whatever its resolution: in the map, the
          many positions of a fine layer, where a normal object's edges and texture score high, dominate
          the top pixels, while a small defect can stand out more in one layer than in the sum.
        * ``"combined"``: the mean of the two, with the ``"map"`` score taken per layer (divided by ``L`` in
          ``"paper"`` mode, whose map sums the layers), so both terms share one scale.

    Args:
        num_layers (int): ``L``, the number of encoder layers.
        sigma (float): Gaussian smoothing in pixels of the input image. Defaults to ``4.0``.
        top_k_percent (float): Share of pixels averaged into the map's image score, in percent (0: the
            map's max). Defaults to ``0.0``.
        score_mode (str): ``"paper"`` or ``"zscore"``. Defaults to ``"paper"``.
        image_score (str): ``"combined"``, ``"map"`` or ``"layer_max"``. Defaults to ``"combined"``.

    """

    def __init__(
        self,
        num_layers: int,
        sigma: float = 4.0,
        top_k_percent: float = 0.0,
        score_mode: ScoreMode = "paper",
        image_score: ImageScore = "combined",
    ) -> None:
        super().__init__()
        if score_mode not in SCORE_MODES:
            msg = f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}."
            raise ConfigurationError(msg)
        if image_score not in IMAGE_SCORES:
            msg = f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}."
            raise ConfigurationError(msg)
        if not 0.0 <= top_k_percent <= 100.0:
            msg = f"top_k_percent must lie in [0, 100], got {top_k_percent}."
            raise ConfigurationError(msg)
        if sigma < 0:
            msg = f"sigma must be >= 0, got {sigma}."
            raise ConfigurationError(msg)
        self.score_mode = score_mode
        self.top_k_percent = top_k_percent
        self.image_score_mode = image_score
        kernel_size = compute_kernel_size(sigma)
        self.blur = GaussianBlur2d(kernel_size, (sigma, sigma), separable=True) if sigma > 0 else nn.Identity()
        self.register_buffer("layer_max", torch.zeros(num_layers))
        self.register_buffer("layer_mean", torch.zeros(num_layers))
        self.register_buffer("layer_std", torch.ones(num_layers))
        self.register_buffer("calibrated", torch.tensor(False))

    @torch.no_grad()
    def set_calibration(self, maximum: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the per-layer constants, each of shape ``(L,)``."""
        self.layer_max.copy_(maximum)
        self.layer_mean.copy_(mean)
        self.layer_std.copy_(std)
        self.calibrated.fill_(True)

    def layer_scores(self, log_likelihoods: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalize each layer's ``(B, h_l, w_l)`` log-likelihoods into ``(B, 1, h_l, w_l)`` scores.

        ``"paper"``: the likelihood ratio ``exp(ll - max_l)`` in ``(0, 1]``, high where normal; ``"zscore"``:
        ``(mean_l - ll) / std_l``, high where anomalous.
        """
        scores = []
        for layer, values in enumerate(log_likelihoods):
            if self.score_mode == "paper":
                scores.append(torch.exp(values - self.layer_max[layer]).unsqueeze(1))
            else:
                scores.append(((self.layer_mean[layer] - values) / self.layer_std[layer]).unsqueeze(1))
        return scores

    def forward(
        self,
        log_likelihoods: Sequence[torch.Tensor],
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate L maps ``(B, h_l, w_l)`` into ``anomaly_map (B, 1, H, W)`` and ``pred_score (B,)``."""
        layer_scores = self.layer_scores(log_likelihoods)
        upsampled = [
            F.interpolate(score, size=image_size, mode="bilinear", align_corners=False) for score in layer_scores
        ]
        aggregate = torch.stack(upsampled).sum(dim=0)
        anomaly_map = len(upsampled) - aggregate if self.score_mode == "paper" else aggregate / len(upsampled)
        anomaly_map = self.blur(anomaly_map)
        if self.image_score_mode == "map":
            return anomaly_map, self.image_score(anomaly_map)
        layer_max = self.layer_max_score(layer_scores)
        if self.image_score_mode == "layer_max":
            return anomaly_map, layer_max
        map_score = self.image_score(anomaly_map)
        if self.score_mode == "paper":
            map_score = map_score / len(layer_scores)
        return anomaly_map, 0.5 * (map_score + layer_max)

    def layer_max_score(self, layer_scores: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over layers of each layer's most anomalous position: L maps ``(B, 1, h_l, w_l)`` -> ``(B,)``.

        In ``"paper"`` mode a layer's anomaly is ``1 - exp(ll - max_l)``, so its most anomalous position is
        ``1 - min exp(ll - max_l)``.
        """
        extremes = []
        for score in layer_scores:
            flat = score.flatten(start_dim=1)
            extremes.append(1.0 - flat.amin(dim=1) if self.score_mode == "paper" else flat.amax(dim=1))
        return torch.stack(extremes).mean(dim=0)

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Mean of the top ``top_k_percent`` % pixels of each map ``(B, 1, H, W)`` -> ``(B,)``."""
        flat = anomaly_map.flatten(start_dim=1)
        if self.top_k_percent == 0:
            return flat.amax(dim=1)
        k = max(1, round(flat.shape[1] * self.top_k_percent / 100.0))
        return flat.topk(k, dim=1).values.mean(dim=1)
