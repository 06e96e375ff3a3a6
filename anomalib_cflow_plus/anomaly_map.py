"""From per-layer log-likelihood maps to a calibrated anomaly map and an image score.

Nothing here reduces across the batch: every image's map and score depend on that image and on
the calibration constants (buffers fitted on normal training fibers) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from anomalib.models.components.filters.blur import compute_kernel_size
from kornia.filters import get_gaussian_kernel1d
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .errors import ConfigurationError

__all__ = [
    "IMAGE_CALIBRATIONS",
    "IMAGE_SCORES",
    "SCORE_MODES",
    "AnomalyMapGenerator",
    "ImageCalibration",
    "ImageScore",
    "ScoreMode",
    "resized_grid",
    "smoothed_upsampling",
]

ScoreMode = Literal["paper", "zscore"]
SCORE_MODES: tuple[str, ...] = ("paper", "zscore")
ImageScore = Literal["combined", "map", "layer_max"]
IMAGE_SCORES: tuple[str, ...] = ("combined", "map", "layer_max")
ImageCalibration = Literal["auto", "layer", "position"]
IMAGE_CALIBRATIONS: tuple[str, ...] = ("auto", "layer", "position")
# Per part type (T,): the standardization of image scores and maps, and whether the image score is position-calibrated.
_PART_TYPE_BUFFERS = ("score_center", "score_scale", "map_center", "map_scale", "position_types")


class AnomalyMapGenerator(nn.Module):
    """Turn per-layer log-likelihood maps into an anomaly map ``(B, 1, H, W)`` and a score ``(B,)``.

    Score modes:
        * ``"paper"``: per layer ``p_l = exp(ll_l - max_l)``, where ``max_l`` is the largest
          log-likelihood seen on normal training fibers (the paper uses the test set's max, which
          couples images in a batch); the map is ``L - sum_l upsample(p_l)``.
        * ``"zscore"``: per layer ``(mean_l - ll_l) / std_l``, upsampled and averaged over layers.

    The map is upsampled bilinearly (``align_corners=False``, as ``F.interpolate``) and smoothed with a Gaussian of
    ``sigma`` pixels (0 disables it), with anomalib's kernel size and a reflect border. Both are linear and
    separable, so each layer's upsampling and smoothing along an axis is one small matrix
    (:func:`smoothed_upsampling`), and the whole map is two matrix products: each layer's scores times its column
    matrix, then all layers at once times the stacked row matrices. There is no full-size intermediate per layer,
    and no separate smoothing pass.
    Image scores:
        * ``"map"``: the mean of the top ``top_k_percent`` % of map pixels, or the map's max when it is 0.
        * ``"layer_max"``: per layer, the most anomalous position's normalized score, averaged over layers.
          Every layer then weighs the same in the image score, whatever its resolution: in the map, the
          many positions of a fine layer, where a normal object's edges and texture score high, dominate
          the top pixels, while a small defect can stand out more in one layer than in the sum.
        * ``"combined"``: the mean of the two, with the ``"map"`` score taken per layer (divided by ``L`` in
          ``"paper"`` mode, whose map sums the layers), so both terms share one scale.

    Image calibration: the image score is taken, by the same ``image_score`` rule, from either the map's layer
    scores (``"layer"``) or per-position z-scores ``(mean_p - ll) / std_p`` of each layer's log-likelihoods against
    the normal training fibers at that position (``"position"``), computed in ``"zscore"`` form. On an aligned part
    whose normal look varies in one region (a highlight whose brightness changes), every good image is least
    likely in that region, so a defect elsewhere must beat it; against its own position's statistics the region
    is ordinary. On parts that move or textures, position is the wrong key, and the score stays the layer's.
    ``"auto"`` (:mod:`~.calibration`) picks per part from the good training images. The map is the layer
    scores' in both cases: per position, it would rank pixels worse (``benchmarks/README.md``, normalization).
    The statistics ``(h_l, w_l)`` are buffers, empty when the score is the layer's, resized bilinearly when a grid
    of another size is scored.

    Part types (a model of several, :meth:`set_part_types`): every constant is kept per type, ``(T, L)`` and
    ``(T, h_l, w_l)``, and each image is scored with its type's (``part_type (B,)``); the image calibration is chosen
    per type. Each type's image scores and maps are then standardized by the mean and std of its good training
    images' scores and maps' maxima (``score_center``/``score_scale``, ``map_center``/``map_scale``, ``(T,)``), so that
    a score means the same for every type and one threshold serves them all.

    Args:
        num_layers (int): ``L``, the number of encoder layers.
        sigma (float): Gaussian smoothing in pixels of the input image. Defaults to ``4.0``.
        top_k_percent (float): Share of pixels averaged into the map's image score, in percent (0: the
            map's max). Defaults to ``0.0``.
        score_mode (str): ``"paper"`` or ``"zscore"``. Defaults to ``"paper"``.
        image_score (str): ``"combined"``, ``"map"`` or ``"layer_max"``. Defaults to ``"combined"``.

    Raises:
        ConfigurationError: On an unknown ``score_mode`` or ``image_score``, a negative ``sigma`` or a
            ``top_k_percent`` outside ``[0, 100]``.

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
        self.sigma = sigma
        self.num_layers = num_layers
        self.register_buffer("layer_max", torch.zeros(num_layers))
        self.register_buffer("layer_mean", torch.zeros(num_layers))
        self.register_buffer("layer_std", torch.ones(num_layers))
        self.register_buffer("calibrated", torch.tensor(False))
        for layer in range(num_layers):  # (h_l, w_l) with a position-calibrated image score, else empty
            self.register_buffer(f"position_mean_{layer}", torch.zeros(0, 0))
            self.register_buffer(f"position_std_{layer}", torch.zeros(0, 0))
        for name in _PART_TYPE_BUFFERS:  # (T,) with part types, else empty
            self.register_buffer(name, torch.zeros(0, dtype=torch.bool if name == "position_types" else None))

    @property
    def part_types(self) -> int:
        """``T``, the number of part types the constants are kept for; 0 for a single-type model."""
        return len(self.score_center)

    def set_part_types(self, count: int) -> None:
        """Keep every constant per part type, for ``count`` types (0: one set, a single-type model); uncalibrated."""
        shape = (count, self.num_layers) if count else (self.num_layers,)
        like = self.layer_max
        self.layer_max, self.layer_mean = like.new_zeros(shape), like.new_zeros(shape)
        self.layer_std = like.new_ones(shape)
        for name in _PART_TYPE_BUFFERS:
            fill = 1.0 if name.endswith("scale") else 0.0
            setattr(self, name, torch.full((count,), fill, dtype=getattr(self, name).dtype, device=like.device))
        self.calibrated.fill_(False)

    @property
    def position_statistics(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's per-position ``(mean, std)``, each ``(h_l, w_l)``; empty when the image score is the layer's."""
        return [
            (getattr(self, f"position_mean_{layer}"), getattr(self, f"position_std_{layer}"))
            for layer in range(self.num_layers)
        ]

    @property
    def position_calibrated(self) -> bool:
        """Whether the image score comes from per-position z-scores (the calibration kept position statistics).

        With part types: whether it does for any type (``position_types`` says which).
        """
        return all(mean.numel() > 0 for mean, _ in self.position_statistics)

    @torch.no_grad()
    def set_calibration(
        self,
        maximum: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        position_statistics: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """Store the per-layer constants, each ``(L,)``, and optionally each layer's per-position ``(mean, std)``.

        ``position_statistics``: L pairs of ``(h_l, w_l)`` tensors; with them the image score is position-calibrated,
        without them (``None``) it is the layer scores'.
        """
        self.layer_max.copy_(maximum)
        self.layer_mean.copy_(mean)
        self.layer_std.copy_(std)
        empty = self.layer_max.new_zeros(0, 0)
        for layer in range(self.num_layers):
            position_mean, position_std = position_statistics[layer] if position_statistics else (empty, empty)
            setattr(self, f"position_mean_{layer}", position_mean.to(self.layer_max).clone())
            setattr(self, f"position_std_{layer}", position_std.to(self.layer_max).clone())
        self.calibrated.fill_(True)

    @torch.no_grad()
    def set_part_type_calibration(
        self,
        constants: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list | None]],
    ) -> None:
        """Store each part type's constants, one :meth:`~.calibration.LayerStatistics.finalize` result per type.

        A type without position statistics keeps zeros and ones in the ``(T, h_l, w_l)`` stacks, unused
        (``position_types`` is ``False`` for it). The standardization is reset to the identity.
        """
        maxima, means, stds, positions = zip(*constants, strict=True)
        kept = [position for position in positions if position is not None]
        stacked = None
        if kept:
            stacked = []
            for layer in range(self.num_layers):
                grid = kept[0][layer][0]
                layer_means = [p[layer][0] if p else torch.zeros_like(grid) for p in positions]
                layer_stds = [p[layer][1] if p else torch.ones_like(grid) for p in positions]
                stacked.append((torch.stack(layer_means), torch.stack(layer_stds)))
        self.set_calibration(torch.stack(maxima), torch.stack(means), torch.stack(stds), stacked)
        self.position_types.copy_(torch.tensor([position is not None for position in positions]))
        centers, scales = torch.zeros(len(constants)), torch.ones(len(constants))
        self.set_standardization(centers, scales, centers, scales)

    @torch.no_grad()
    def set_standardization(
        self, score_center: torch.Tensor, score_scale: torch.Tensor, map_center: torch.Tensor, map_scale: torch.Tensor
    ) -> None:
        """Store each part type's image-score and map standardization, each ``(T,)``."""
        for name, value in zip(_PART_TYPE_BUFFERS[:4], (score_center, score_scale, map_center, map_scale), strict=True):
            getattr(self, name).copy_(value)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Take the constants at their saved shapes: part types, grid sizes (or none, from older checkpoints)."""
        for name in ("layer_max", "layer_mean", "layer_std"):
            if prefix + name in state_dict:
                setattr(self, name, self.layer_max.new_empty(state_dict[prefix + name].shape))
        for layer in range(self.num_layers):
            for name in (f"position_mean_{layer}", f"position_std_{layer}"):
                saved = state_dict.setdefault(prefix + name, torch.zeros(0, 0))
                setattr(self, name, self.layer_max.new_empty(saved.shape))
        for name in _PART_TYPE_BUFFERS:
            saved = state_dict.setdefault(prefix + name, getattr(self, name).new_zeros(0))
            setattr(self, name, getattr(self, name).new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def position_scores(
        self, log_likelihoods: Sequence[torch.Tensor], part_type: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per-position z-scores ``(mean_p - ll) / std_p`` of L maps ``(B, h_l, w_l)``: L tensors ``(B, 1, h_l, w_l)``.

        The statistics are resized bilinearly onto a grid of another size; with part types, each image's are its
        type's (``part_type (B,)``).
        """
        scores = []
        for values, (mean, std) in zip(log_likelihoods, self.position_statistics, strict=True):
            if mean.shape[-2:] != values.shape[-2:]:
                mean, std = resized_grid(mean, values.shape[-2:]), resized_grid(std, values.shape[-2:])
            if part_type is not None and self.part_types:
                mean, std = mean[part_type], std[part_type]
            scores.append(((mean.to(values.dtype) - values) / std.to(values.dtype)).unsqueeze(-3))
        return scores

    def layer_scores(
        self, log_likelihoods: Sequence[torch.Tensor], part_type: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Normalize each layer's ``(B, h_l, w_l)`` log-likelihoods into ``(B, 1, h_l, w_l)`` scores.

        ``"paper"``: the likelihood ratio ``exp(ll - max_l)`` in ``(0, 1]``, high where normal; ``"zscore"``:
        ``(mean_l - ll) / std_l``, high where anomalous. With part types, each image's constants are its type's.
        """
        maximum, mean, std = self.layer_max, self.layer_mean, self.layer_std
        if part_type is not None and self.part_types:  # (B, L) -> (L, B, 1, 1): a per-image constant per layer
            maximum, mean, std = (constant[part_type].T[..., None, None] for constant in (maximum, mean, std))
        scores = []
        for layer, values in enumerate(log_likelihoods):
            if self.score_mode == "paper":
                scores.append(torch.exp(values - maximum[layer]).unsqueeze(1))
            else:
                scores.append(((mean[layer] - values) / std[layer]).unsqueeze(1))
        return scores

    def forward(
        self,
        log_likelihoods: Sequence[torch.Tensor],
        image_size: tuple[int, int],
        part_type: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate L maps ``(B, h_l, w_l)`` into ``anomaly_map (B, 1, H, W)`` and ``pred_score (B,)``.

        ``part_type (B,)``: each image's part type, for a model of several (then required).
        """
        if self.part_types:
            return self.part_type_forward(log_likelihoods, image_size, part_type)
        layer_scores = self.layer_scores(log_likelihoods)
        anomaly_map = self.smoothed_map(layer_scores, image_size)
        if not self.position_calibrated:
            return anomaly_map, self.scores_of(layer_scores, anomaly_map, self.score_mode)
        position_scores = self.position_scores(log_likelihoods)
        position_map = None  # the z-scores' own map, only where the image score reads a map
        if self.image_score_mode != "layer_max":
            position_map = self.smoothed_map(position_scores, image_size, "zscore")
        return anomaly_map, self.scores_of(position_scores, position_map, "zscore")

    def part_type_forward(
        self, log_likelihoods: Sequence[torch.Tensor], image_size: tuple[int, int], part_type: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` of a model of several part types: each image with its type's constants, standardized."""
        if part_type is None:
            msg = "A model of several part types scores an image with its part type: pass part_type (B,)."
            raise ValueError(msg)
        layer_scores = self.layer_scores(log_likelihoods, part_type)
        anomaly_map = self.smoothed_map(layer_scores, image_size)
        pred_score = self.scores_of(layer_scores, anomaly_map, self.score_mode)
        if self.position_calibrated:  # for some types: those types' images take the position-calibrated score
            position_scores = self.position_scores(log_likelihoods, part_type)
            position_map = None
            if self.image_score_mode != "layer_max":
                position_map = self.smoothed_map(position_scores, image_size, "zscore")
            position_score = self.scores_of(position_scores, position_map, "zscore")
            pred_score = torch.where(self.position_types[part_type], position_score, pred_score)
        pred_score = (pred_score - self.score_center[part_type]) / self.score_scale[part_type]
        map_center, map_scale = self.map_center[part_type], self.map_scale[part_type]
        anomaly_map = (anomaly_map - map_center[:, None, None, None]) / map_scale[:, None, None, None]
        return anomaly_map, pred_score

    def scores_of(
        self, layer_scores: Sequence[torch.Tensor], anomaly_map: torch.Tensor | None, score_mode: ScoreMode
    ) -> torch.Tensor:
        """Image scores ``(B,)`` by the ``image_score`` rule, from layer scores ``(B, 1, h_l, w_l)`` and their map."""
        if self.image_score_mode == "map":
            return self.image_score(anomaly_map)
        layer_max = self.layer_max_score(layer_scores, score_mode)
        if self.image_score_mode == "layer_max":
            return layer_max
        map_score = self.image_score(anomaly_map)
        if score_mode == "paper":
            map_score = map_score / len(layer_scores)
        return 0.5 * (map_score + layer_max)

    def smoothed_map(
        self, layer_scores: Sequence[torch.Tensor], image_size: tuple[int, int], score_mode: ScoreMode | None = None
    ) -> torch.Tensor:
        """L layer scores ``(B, 1, h_l, w_l)`` -> the smoothed anomaly map ``(B, 1, H, W)``.

        ``"paper"``: ``L - smooth(sum_l upsample(p_l))``, computed as ``sum_l smooth(upsample(1 - p_l))`` (the same,
        as both maps keep constants), which stays accurate in bf16, where ``L - (a sum near L)`` would not;
        ``"zscore"``: the layers' mean. Each term is ``R_l @ s_l @ C_l.T`` with ``R_l (H, h_l)`` and ``C_l (W, w_l)``
        from :func:`smoothed_upsampling`. ``score_mode`` defaults to the generator's.
        """
        height, width = image_size
        count = len(layer_scores)
        paper = (score_mode or self.score_mode) == "paper"
        anomalies = [1.0 - score if paper else score / count for score in layer_scores]
        rows, spread = [], []
        for anomaly in anomalies:
            like = (anomaly.device, anomaly.dtype)
            rows.append(smoothed_upsampling(anomaly.shape[-2], height, self.sigma, *like))
            spread.append(anomaly @ smoothed_upsampling(anomaly.shape[-1], width, self.sigma, *like).T)  # (B,1,h_l,W)
        return torch.cat(rows, dim=1) @ torch.cat(spread, dim=-2)  # (H, sum h_l) @ (B, 1, sum h_l, W)

    def layer_max_score(
        self, layer_scores: Sequence[torch.Tensor], score_mode: ScoreMode | None = None
    ) -> torch.Tensor:
        """Mean over layers of each layer's most anomalous position: L maps ``(B, 1, h_l, w_l)`` -> ``(B,)``.

        In ``"paper"`` mode a layer's anomaly is ``1 - exp(ll - max_l)``, so its most anomalous position is
        ``1 - min exp(ll - max_l)``. ``score_mode`` defaults to the generator's.
        """
        paper = (score_mode or self.score_mode) == "paper"
        extremes = []
        for score in layer_scores:
            flat = score.flatten(start_dim=1)
            extremes.append(1.0 - flat.amin(dim=1) if paper else flat.amax(dim=1))
        return torch.stack(extremes).mean(dim=0)

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Mean of the top ``top_k_percent`` % pixels of each map ``(B, 1, H, W)`` -> ``(B,)``."""
        flat = anomaly_map.flatten(start_dim=1)
        if self.top_k_percent == 0:
            return flat.amax(dim=1)
        k = max(1, round(flat.shape[1] * self.top_k_percent / 100.0))
        return flat.topk(k, dim=1).values.mean(dim=1)


def resized_grid(values: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resize per-position statistics ``(..., h, w)`` bilinearly onto ``grid`` ``(h', w')`` -> ``(..., h', w')``."""
    flat = values.reshape(-1, 1, *values.shape[-2:])
    resized = F.interpolate(flat, size=tuple(grid), mode="bilinear", align_corners=False)
    return resized.reshape(*values.shape[:-2], *grid)


def smoothed_upsampling(
    size: int,
    output_size: int,
    sigma: float,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build the linear map of bilinear upsampling then Gaussian smoothing along one axis, ``(output_size, size)``.

    Row ``i`` holds the weights of the ``size`` inputs in output ``i``. Upsampling is ``F.interpolate``
    (``align_corners=False``) of each unit vector; smoothing (``sigma`` > 0) is kornia's Gaussian with anomalib's
    kernel size and a reflect border, applied as a weighted sum of reflected rows, which an exporter folds into a
    constant (a convolution of constants it does not fold). Upsampling and smoothing a map ``(h, w)`` is then
    ``smoothed_upsampling(h, H) @ map @ smoothed_upsampling(w, W).T``, as the 2-D filters are separable.
    """
    basis = torch.eye(size, device=device, dtype=dtype)[None]  # (1, size, size): one unit vector per channel
    weights = F.interpolate(basis, size=output_size, mode="linear", align_corners=False)[0].T  # (output, size)
    if sigma == 0:
        return weights
    kernel = get_gaussian_kernel1d(compute_kernel_size(sigma), sigma, device=device, dtype=dtype)[0]  # (k,)
    taps = (
        torch.arange(output_size, device=device)[:, None] + torch.arange(len(kernel), device=device) - len(kernel) // 2
    )
    taps = taps.abs()  # reflect at the first row, and at the last:
    taps = torch.where(taps > output_size - 1, 2 * (output_size - 1) - taps, taps)  # (output, k)
    return (weights[taps] * kernel[:, None]).sum(dim=1)
