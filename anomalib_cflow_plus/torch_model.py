"""CflowPlusModel: frozen encoder, one conditional flow decoder per layer, calibrated anomaly map.

Pure PyTorch; nothing here depends on Lightning.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import timm
import torch
from anomalib.data import InferenceBatch
from anomalib.data.utils.tiler import ImageUpscaleMode, Tiler
from anomalib.models.components.feature_extractors import TimmFeatureExtractor
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .anomaly_map import IMAGE_CALIBRATIONS, AnomalyMapGenerator, ImageCalibration, ImageScore, ScoreMode
from .backbones import load_encoder_weights, resolve_state_dict
from .condition import GridCondition, check_condition_dim, grid_condition
from .errors import ConfigurationError, NotCalibratedError
from .flow import FiberActNorm, build_decoder, grid_log_likelihood, log_likelihood, set_decoder_part_types
from .part_types import PartTypeRecognizer, image_descriptors
from .precision import float32_region

__all__ = [
    "TILE_CONDITIONS",
    "CflowPlusModel",
    "ImageEvidence",
    "TileCondition",
    "feature_levels",
    "local_mean",
    "resolve_layers",
    "similar_backbones",
]

TileCondition = Literal["image", "tile"]
TILE_CONDITIONS: tuple[str, ...] = ("image", "tile")
# Families whose shallow stride-4 features are too thin to help; they use strides 8/16/32.
_DEEP_DEFAULT_FAMILIES = ("efficientnet", "mobilenet", "tf_efficientnet")


class ImageEvidence(NamedTuple):
    """What a model reads from a batch of images: log-likelihood maps and, with several part types, the types.

    Attributes:
        maps: L log-likelihood maps ``(B, h_l, w_l)``, tiles stitched.
        part_type: Part-type index of each image ``(B,)``, or ``None`` for a single-type model.
        descriptors: Global descriptors ``(B, D)`` the types are recognized from, or ``None`` as above.

    """

    maps: list[torch.Tensor]
    part_type: torch.Tensor | None = None
    descriptors: torch.Tensor | None = None


def feature_levels(backbone: str) -> list[dict]:
    """Timm's feature info of ``backbone``: one dict per level with ``module``, ``num_chs`` and ``reduction``.

    Builds the architecture without weights, so it never touches the network.
    """
    if not timm.is_model(backbone):
        msg = f"Unknown backbone {backbone!r}. Any timm model name works; {similar_backbones(backbone)}"
        raise ConfigurationError(msg)
    probe = timm.create_model(backbone, pretrained=False, features_only=True, exportable=True)
    return list(probe.feature_info.info)


def similar_backbones(backbone: str, count: int = 8) -> str:
    """Say which timm model names are closest to ``backbone`` (by ``difflib``), or how to list them all."""
    names = timm.list_models()
    close = difflib.get_close_matches(backbone.lower(), names, n=count, cutoff=0.6)
    if not close:  # e.g. a family name alone: "resnet", "convnext"
        close = [name for name in names if backbone.lower() in name][:count]
    if close:
        return f"the closest are: {', '.join(close)}."
    return (
        "efficientnet_lite0, efficientnet_lite1 and efficientnet_lite2 have packaged ImageNet weights (offline); list "
        'every name with: python -c "import timm; print(timm.list_models())".'
    )


def resolve_layers(backbone: str, layers: Sequence[str] | None, levels: Sequence[dict]) -> list[str]:
    """Validate ``layers`` against the backbone's feature ``levels``, or choose the default three.

    The default follows the paper: three consecutive levels, at strides 4/8/16 (``layer1..3`` of
    a ResNet); for EfficientNet/MobileNet families, strides 8/16/32, whose stride-4 level is thin.
    """
    names = [level["module"] for level in levels]
    if layers is None:
        strides = (8, 16, 32) if backbone.startswith(_DEEP_DEFAULT_FAMILIES) else (4, 8, 16)
        chosen = [level["module"] for level in levels if level["reduction"] in strides]
        if len(chosen) != len(strides):
            chosen = names[-3:]
        return chosen
    unknown = [layer for layer in layers if layer not in names]
    if unknown or not layers or len(set(layers)) != len(layers):
        msg = f"Invalid layers {list(layers)} for backbone {backbone!r} (unknown: {unknown}). Valid layers: {names}."
        raise ConfigurationError(msg)
    return sorted(layers, key=names.index)


class CflowPlusModel(nn.Module):
    """CFLOW-AD: a frozen encoder and one conditional normalizing-flow decoder per pooled layer.

    Args:
        backbone (str): timm model name of the encoder. Its weights are loaded by :meth:`load_pretrained`;
            construction never touches the network. Defaults to ``"efficientnet_lite1"``.
        layers (Sequence[str] | None): Encoder levels (timm module names) to model, or ``None`` for the
            default (:func:`resolve_layers`). Defaults to ``None``.
        condition_vector (int): ``P``, the positional-encoding dimension (a multiple of 4). Defaults to ``128``.
        coupling_blocks (int): ``K``, coupling blocks per decoder. Defaults to ``8``.
        hidden_ratio (float): Hidden width of the coupling subnets as a multiple of the paper's, ``2 * (C/2 + P)``.
            Defaults to ``1.0``.
        neighbourhood (int): Side of the square neighbourhood of fibers averaged into each fiber before the flows
            (odd; PatchCore's locally aware features): every decoder then models a fiber with its local context.
            ``1`` models each fiber alone, as the paper does. Defaults to ``1``.
        clamp_alpha (float): Soft-clamp bound of the couplings' log-scale. Defaults to ``1.9``.
        sigma (float): Gaussian smoothing of the anomaly map, in pixels. Defaults to ``4.0``.
        top_k_percent (float): Share of map pixels averaged into the map's image score (0: the max). Defaults
            to ``0.0``.
        score_mode (str): ``"paper"`` or ``"zscore"``, see :class:`AnomalyMapGenerator`. Defaults to
            ``"paper"``.
        image_score (str): ``"combined"``, ``"map"`` or ``"layer_max"``, see :class:`AnomalyMapGenerator`.
            Defaults to ``"combined"``.
        image_calibration (str): What the image score is normalized against: ``"layer"`` (one constant per layer,
            as the map), ``"position"`` (each position's normal statistics) or ``"auto"``: ``"position"`` for a part
            whose good training images are least likely at one place in every layer, else ``"layer"``; see
            :class:`AnomalyMapGenerator` and :meth:`~.calibration.LayerStatistics.finalize`. Defaults to ``"auto"``.
        tile_condition (str): With anomalib's tiler (``tiler``, set by ``TilerConfigurationCallback``):
            ``"image"`` stitches the tiles' features back into the whole image's feature maps, so every fiber is
            conditioned on its position in the whole image; ``"tile"`` scores each tile on its own, conditioned
            on positions within the tile, and stitches the log-likelihood maps. ``benchmarks/README.md``
            (tiling) has the measurement that chose the default. Defaults to ``"image"``.

    Raises:
        ConfigurationError: On an unknown backbone or layer, or an option that cannot work, naming what would.

    Attributes:
        tiler: anomalib's :class:`~anomalib.data.utils.tiler.Tiler`, or ``None`` (no tiling). Its tile size and
            stride must be multiples of the encoder's largest stride, so that tiles' feature maps line up.

    Example:
        >>> import torch
        >>> from anomalib_cflow_plus.torch_model import CflowPlusModel
        >>> model = CflowPlusModel(backbone="efficientnet_lite0").eval()
        >>> model.encoder.out_dims
        [40, 112, 320]
        >>> len(model.log_likelihood_maps(model.encode(torch.rand(2, 3, 256, 256))))  # one (B, h_l, w_l) per layer
        3

    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite1",
        layers: Sequence[str] | None = None,
        condition_vector: int = 128,
        coupling_blocks: int = 8,
        hidden_ratio: float = 1.0,
        neighbourhood: int = 1,
        clamp_alpha: float = 1.9,
        sigma: float = 4.0,
        top_k_percent: float = 0.0,
        score_mode: ScoreMode = "paper",
        image_score: ImageScore = "combined",
        image_calibration: ImageCalibration = "auto",
        tile_condition: TileCondition = "image",
    ) -> None:
        super().__init__()
        if image_calibration not in IMAGE_CALIBRATIONS:
            msg = f"image_calibration must be one of {IMAGE_CALIBRATIONS}, got {image_calibration!r}."
            raise ConfigurationError(msg)
        if tile_condition not in TILE_CONDITIONS:
            msg = f"tile_condition must be one of {TILE_CONDITIONS}, got {tile_condition!r}."
            raise ConfigurationError(msg)
        check_condition_dim(condition_vector)
        if coupling_blocks < 1:
            msg = f"coupling_blocks must be >= 1, got {coupling_blocks}."
            raise ConfigurationError(msg)
        if clamp_alpha <= 0:
            msg = f"clamp_alpha must be > 0, got {clamp_alpha}."
            raise ConfigurationError(msg)
        if not 0 < hidden_ratio <= 16:
            msg = f"hidden_ratio must be in (0, 16], got {hidden_ratio}."
            raise ConfigurationError(msg)
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            msg = f"neighbourhood must be an odd number >= 1 (1: each fiber alone, 3: 3x3 fibers), got {neighbourhood}."
            raise ConfigurationError(msg)
        self.backbone = backbone
        levels = feature_levels(backbone)
        self.layers = resolve_layers(backbone, layers, levels)
        self.condition_vector = condition_vector
        names = [level["module"] for level in levels]
        # Integer out-indices spare the extractor a second probe model; its outputs are keyed by index.
        self.encoder = TimmFeatureExtractor(backbone, [names.index(layer) for layer in self.layers], pre_trained=False)
        # NHWC: oneDNN's and cuDNN's fast convolution layout (README, "How CflowPlus works"), and NHWC feature
        # maps make each layer's fibers, (B, h, w, C) or (B, h*w, C), a view rather than a copy. Loading weights
        # (``load_state_dict`` copies into these tensors) and moving devices keep the layout.
        self.encoder.to(memory_format=torch.channels_last)
        self.encoder.requires_grad_(False)  # frozen: only the decoders learn
        self.coupling_blocks = coupling_blocks
        self.hidden_ratio = hidden_ratio
        self.neighbourhood = neighbourhood
        self.clamp_alpha = clamp_alpha
        self.part_types = PartTypeRecognizer(sum(self.encoder.out_dims))
        self.decoders = self._build_decoders()
        self.anomaly_map = AnomalyMapGenerator(len(self.layers), sigma, top_k_percent, score_mode, image_score)
        self.image_calibration = image_calibration
        self.tile_condition = tile_condition
        self._tiler: Tiler | None = None

    def adopt_part_types(self, names: Sequence[str], fitting: bool) -> None:
        """Take a datamodule's part types ``names``: a fresh model about to be fitted becomes one of those types.

        A fitted model keeps its own: it recognizes its types from the images, whatever the datamodule calls them.

        Raises:
            ConfigurationError: When a fitted model would be fitted again on other part types.

        """
        if list(names) == self.part_types.names:
            return
        if fitting and self.calibrated:
            trained = ", ".join(self.part_types.names) or "a single part type"
            msg = (
                f"This model was fitted on {trained}; it cannot go on fitting on the part types {', '.join(names)}. "
                "Fit a fresh CflowPlus on them instead."
            )
            raise ConfigurationError(msg)
        if fitting:
            self.set_part_types(names)

    def _build_decoders(self) -> nn.ModuleList:
        decoders = nn.ModuleList(
            build_decoder(
                channels, self.condition_vector, self.coupling_blocks, self.clamp_alpha, index, self.hidden_ratio
            )
            for index, channels in enumerate(self.encoder.out_dims)
        )
        if self.part_types.count:
            for decoder in decoders:
                set_decoder_part_types(decoder, self.part_types.count)
        return decoders

    def set_part_types(self, names: Sequence[str]) -> None:
        """Make this one model of the part types ``names``: decoders conditioned on the type, calibration per type.

        The decoders' type vectors are drawn afresh and the model is uncalibrated until it is fitted.
        """
        self.part_types.set_names(names)
        for decoder in self.decoders:
            set_decoder_part_types(decoder, self.part_types.count)
        self.anomaly_map.set_part_types(self.part_types.count)

    def reset_decoders(self) -> None:
        """Draw new, untrained decoders from the global random state (e.g. after seeding it)."""
        self.decoders = self._build_decoders()

    @property
    def tiler(self) -> Tiler | None:
        """The tiler (anomalib's), or ``None``; ``TilerConfigurationCallback`` sets it."""
        return self._tiler

    @tiler.setter
    def tiler(self, tiler: Tiler | None) -> None:
        if tiler is not None:
            stride = max(self.encoder.feature_extractor.feature_info.reduction())
            sizes = (tiler.tile_size_h, tiler.tile_size_w, tiler.stride_h, tiler.stride_w)
            if any(size % stride for size in sizes) or tiler.remove_border_count:
                msg = (
                    f"Tile size and stride must be multiples of the encoder's stride {stride}, with no border removed "
                    f"(got tile {tiler.tile_size_h}x{tiler.tile_size_w}, stride {tiler.stride_h}x{tiler.stride_w}, "
                    f"remove_border_count {tiler.remove_border_count}), so that the tiles' feature maps line up."
                )
                raise ConfigurationError(msg)
            if tiler.mode != ImageUpscaleMode.PADDING:
                msg = f"CflowPlus tiles with ImageUpscaleMode.PADDING only, got {tiler.mode}."
                raise ConfigurationError(msg)
        self._tiler = tiler

    def train(self, mode: bool = True) -> CflowPlusModel:
        """Switch the decoders' mode; the encoder stays in eval mode, so its BatchNorm never moves."""
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def feature_encoder(self) -> nn.Module:
        """The timm ``features_only`` network inside the anomalib feature extractor."""
        return self.encoder.feature_extractor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen features: images ``(B, 3, H, W)`` -> L tensors ``(B, C_l, h_l, w_l)``.

        With a tiler, the encoder sees tiles. ``tile_condition="image"`` stitches their features into the
        whole image's maps ``(B, C_l, h_l, w_l)``; ``"tile"`` returns them per tile, ``(B * T, C_l, h_l, w_l)``.
        """
        with float32_region(images):  # features are float32 under mixed precision too (see .precision)
            if self.tiler is None:
                return [self.aggregate(layer_features) for layer_features in self.encoder(images).values()]
            features = list(self.encoder(self.tiler.tile(images)).values())
        if self.tile_condition == "image":
            features = [self.untile(layer_features) for layer_features in features]
        return [self.aggregate(layer_features) for layer_features in features]

    def aggregate(self, features: torch.Tensor) -> torch.Tensor:
        """Average each fiber of ``(B, C, h, w)`` features with its ``neighbourhood x neighbourhood`` neighbours.

        Padding is left out of the averages (``count_include_pad=False``), so a border fiber is the mean of the
        fibers it has, not shrunk towards zero. Per image and per channel: nothing crosses the batch.
        """
        return local_mean(features, self.neighbourhood)

    def untile(self, tiles: torch.Tensor) -> torch.Tensor:
        """Stitch per-tile maps ``(B * T, C, h_t, w_t)`` into the whole image's ``(B, C, h, w)``.

        The tiler pads an image whose size does not fit its tiles; the part of the map over that padding is cut
        off, so that the map covers the image alone and upsamples onto it without a shift.
        """
        scale_h, scale_w = tiles.shape[-2] / self.tiler.tile_size_h, tiles.shape[-1] / self.tiler.tile_size_w
        whole = self.tiler.untile(tiles)
        return whole[..., : math.ceil(self.tiler.input_h * scale_h), : math.ceil(self.tiler.input_w * scale_w)]

    def condition(self, height: int, width: int, reference: torch.Tensor) -> GridCondition:
        """Separable positional condition of every position of an ``height x width`` map.

        Recomputed on each call (``h + w`` encodings, microseconds) rather than cached: a cache
        would hold tensors from the exporter's tracing, and the exporter folds this into a constant.
        """
        return grid_condition(self.condition_vector, height, width, reference.device, reference.dtype)

    def fibers(
        self, features: torch.Tensor, part_type: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, GridCondition]:
        """Features ``(B, C, h, w)`` -> fibers ``(B, h*w, C)`` in row-major position order, and their condition.

        ``part_type (B,)``: each feature map's part type, for a model of several.
        """
        height, width = features.shape[-2:]
        fibers = features.flatten(start_dim=2).transpose(1, 2)
        return fibers, self.condition(height, width, features)._replace(part_type=part_type)

    def feature_part_type(self, part_type: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        """Part type of each feature map ``(B * tiles, ...)`` from each image's ``(B,)``: tiles share their image's.

        Raises:
            ValueError: When a model of several part types is given no types (its batches must carry them).

        """
        if part_type is None:
            msg = (
                f"This model is one of several part types ({', '.join(self.part_types.names)}): it trains and "
                "calibrates on batches that say each image's part type (anomalib_cflow_plus.data.MultiCategory)."
            )
            raise ValueError(msg)
        part_type = part_type.to(features.device, torch.long).flatten()
        per_image = self.tiles_per_feature_batch
        return part_type.repeat_interleave(per_image) if per_image > 1 else part_type

    @property
    def tiles_per_feature_batch(self) -> int:
        """Feature maps per image in :meth:`encode`'s output: the tiles with ``tile_condition="tile"``, else 1.

        Read after :meth:`encode` (the tiler counts its tiles when it tiles); a constant, so an export keeps its
        batch dynamic.
        """
        if self.tiler is None or self.tile_condition == "image":
            return 1
        return self.tiler.num_patches_h * self.tiler.num_patches_w

    def fiber_log_likelihood(
        self,
        layer: int,
        fibers: torch.Tensor,
        condition: torch.Tensor | GridCondition,
    ) -> torch.Tensor:
        """Per-dimension log-likelihood of fibers ``(..., C_l)`` under decoder ``layer`` -> ``(...)``."""
        z, log_jac_det = self.decoders[layer](fibers, c=[condition])
        return log_likelihood(z, log_jac_det)

    def log_likelihood_maps(
        self, features: Sequence[torch.Tensor], part_type: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Log-likelihood maps: L tensors ``(B, h_l, w_l)``; each layer's whole grid goes through its decoder at once.

        Features ``(B, C_l, h_l, w_l)`` are NHWC in memory, so their fibers ``(B, h_l, w_l, C_l)`` are a view; the
        decoders run in their inference form (:func:`~.flow.grid_log_likelihood`). ``part_type (B,)``: each feature
        map's part type, for a model of several.
        """
        return [
            grid_log_likelihood(
                decoder,
                layer_features.permute(0, 2, 3, 1),
                self.condition(*layer_features.shape[-2:], layer_features)._replace(part_type=part_type),
            )
            for decoder, layer_features in zip(self.decoders, features, strict=True)
        ]

    @property
    def normalizations(self) -> list[FiberActNorm]:
        """Each decoder's input normalization (its first block, an ActNorm), in layer order."""
        return [decoder[0] for decoder in self.decoders]

    @torch.no_grad()
    def initialize_normalization(self, features: Sequence[torch.Tensor]) -> None:
        """Data-initialize each decoder's ActNorm from one batch of features ``(B, C_l, h_l, w_l)``."""
        for actnorm, layer_features in zip(self.normalizations, features, strict=True):
            if not bool(actnorm.initialized):
                actnorm.initialize(self.fibers(layer_features)[0])

    @property
    def normalization_initialized(self) -> bool:
        """Whether every decoder's ActNorm has been data-initialized."""
        return all(bool(actnorm.initialized) for actnorm in self.normalizations)

    def load_pretrained(self, weights: str | None = None) -> None:
        """Load the encoder's ImageNet weights: from ``weights`` (a local file), a weight package or the timm hub.

        See :func:`~.backbones.resolve_state_dict` for where they come from, offline first.

        Raises:
            BackboneWeightsError: When no weights can be found or loaded, saying how to provide them.

        """
        state_dict = resolve_state_dict(self.backbone, weights)
        load_encoder_weights(self.feature_encoder, state_dict, self.backbone)

    def image_log_likelihood_maps(
        self, images: torch.Tensor, part_type: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Log-likelihood maps of whole images ``(B, 3, H, W)``: L tensors ``(B, h_l, w_l)``, tiles stitched.

        Computed in float32 under mixed precision too: calibration and scoring must agree with an exported model.
        ``part_type (B,)``: the images' part types, for a model of several (``None``: recognized, see :meth:`evidence`).
        """
        return self.evidence(images, part_type).maps

    def evidence(self, images: torch.Tensor, part_type: torch.Tensor | None = None) -> ImageEvidence:
        """Log-likelihood maps of images ``(B, 3, H, W)``, with each image's part type for a model of several.

        The part type is ``part_type (B,)`` when given (training and calibration know it), else the nearest
        prototype's (:class:`~.part_types.PartTypeRecognizer`): inference needs the image alone.
        """
        descriptors = feature_types = None
        with float32_region(images):
            features = self.encode(images)
            if self.part_types.count:
                descriptors = image_descriptors(features, self.tiles_per_feature_batch)
                if part_type is None:
                    part_type = self.part_types(descriptors)
                feature_types = self.feature_part_type(part_type, features[0])
                part_type = part_type.to(images.device, torch.long).flatten()
            maps = self.log_likelihood_maps(features, feature_types)
        if self.tiler is not None and self.tile_condition == "tile":  # per-tile maps (B*T, h, w) -> (B, h', w')
            maps = [self.untile(layer_map.unsqueeze(1)).squeeze(1) for layer_map in maps]
        return ImageEvidence(maps, part_type if self.part_types.count else None, descriptors)

    @property
    def calibrated(self) -> bool:
        """Whether the calibration constants are fitted (always ``True`` on the ``meta`` device, which holds none)."""
        flag = self.anomaly_map.calibrated
        return flag.is_meta or bool(flag)

    def require_calibration(self, action: str = "score") -> None:
        """Refuse to ``action`` (score, validate, export, ...) before the calibration constants are fitted.

        Without them every layer's scores have a constant of zero, and the layers are not comparable: the scores
        and maps would look plausible and be wrong.

        Raises:
            NotCalibratedError: When the model has not been fitted.

        """
        if not self.calibrated:
            msg = (
                f"CflowPlus cannot {action}: it has not been fitted, so its scores are not calibrated. Train it first "
                "(engine.fit / anomalib train), or load a trained checkpoint (ckpt_path=... / --ckpt_path); a torch "
                "model alone is calibrated by anomalib_cflow_plus.calibration.calibrate(model, normal_images, device)."
            )
            raise NotCalibratedError(msg)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score images ``(B, 3, H, W)``: ``pred_score (B,)`` and ``anomaly_map (B, 1, H, W)``, in float32.

        Raises:
            NotCalibratedError: When the model has not been fitted (checked in eager mode; an export checks first).

        """
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.require_calibration("score images")
        with float32_region(images):
            evidence = self.evidence(images)
            anomaly_map, pred_score = self.anomaly_map(evidence.maps, tuple(images.shape[-2:]), evidence.part_type)
            if evidence.descriptors is not None:  # an image unlike its nearest trained type is anomalous
                pred_score = pred_score + self.part_types.novelty(evidence.descriptors, evidence.part_type)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


def local_mean(values: torch.Tensor, side: int) -> torch.Tensor:
    """Mean of each position of ``(B, C, h, w)`` and its ``side x side`` neighbours, padding left out (1: unchanged)."""
    if side == 1:
        return values
    return F.avg_pool2d(values, side, stride=1, padding=side // 2, count_include_pad=False)
