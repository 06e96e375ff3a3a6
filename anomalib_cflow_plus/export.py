"""Export of CflowPlus: fast loop-free ONNX/OpenVINO graphs, and the hooks that quantize them to INT8.

:class:`CflowPlusExportMixin` overrides three hooks of anomalib's ``ExportMixin``:

* ``to_onnx`` (and so ``to_openvino``, which goes through ONNX): opset 18, activations switched to out-of-place
  while tracing, and constant folding instead of onnxscript's full optimizer. The graph computes the same values;
  the export takes about half the time.
* ``_post_training_quantization_ov`` (``INT8_PTQ``): NNCF calibrates on the *training* images (anomalib's default
  calibrates on the validation split, which is often the test set) and quantizes the encoder and the flows'
  linear layers; the scoring tail stays FP32 (see :mod:`~.quantization`).
* ``_accuracy_control_quantization_ov`` (``INT8_ACQ``): the same, checked on the validation split; if the
  metric drops by more than ``max_drop``, the encoder goes back to FP32 (see
  :data:`~.quantization.ACCURACY_CONTROL_STAGES`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import ConfigurationError
from .quantization import (
    ACCURACY_CONTROL_STAGES,
    calibration_dataset,
    decoder_weights,
    input_resizer,
    quantize,
    resolve_metric,
    validation_function,
)

if TYPE_CHECKING:
    import openvino as ov
    from anomalib import TaskType
    from anomalib.data import AnomalibDataModule
    from torchmetrics import Metric

__all__ = ["CflowPlusExportMixin", "fold_onnx_constants", "out_of_place_activations"]

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
CONSTANT_FOLDING_LOGGER = "onnxscript.optimizer._constant_folding"


@contextmanager
def out_of_place_activations(module: nn.Module) -> Iterator[int]:
    """Switch every ``inplace=True`` submodule (timm's ReLU6, BatchNormAct, ...) to out-of-place, then back.

    ``torch.export`` functionalizes each in-place op, which is slow with a symbolic batch size; out-of-place
    activations compute the same values. Yields the number of submodules switched.
    """
    switched = [child for child in module.modules() if getattr(child, "inplace", None) is True]
    for child in switched:
        child.inplace = False
    try:
        yield len(switched)
    finally:
        for child in switched:
            child.inplace = True


@contextmanager
def quiet_constant_folding() -> Iterator[None]:
    """Hide onnxscript's INFO line per node it does not fold (one per large constant: thousands of lines).

    Its warnings and errors still show.
    """
    folding_logger = logging.getLogger(CONSTANT_FOLDING_LOGGER)
    level = folding_logger.level
    folding_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        folding_logger.setLevel(level)


def fold_onnx_constants(path: Path) -> None:
    """Fold the constant subgraphs of the ONNX file at ``path`` (e.g. the positional conditions), drop dead nodes.

    This is the part of onnxscript's optimizer that the graph needs; its pattern rewrites, a third of the export
    time, only fuse ops that ONNX Runtime and OpenVINO fuse themselves when they load a model.
    """
    from onnxscript import ir, optimizer

    model = ir.load(path)
    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    ir.save(model, path)


class CflowPlusExportMixin:
    """CflowPlus's overrides of anomalib's export hooks; list it before ``AnomalibModule`` among the bases.

    ``to_torch`` and ``to_openvino`` stay anomalib's; ``to_openvino`` reaches :meth:`to_onnx` and, for
    ``INT8_PTQ``/``INT8_ACQ``, the two quantization hooks below.
    """

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX at opset 18, with out-of-place activations and constant folding.

        Opset 18 is what torch's exporter writes: anomalib's default of 14 makes it down-convert the smoothing
        filter's ``Pad``, which has no adapter and falls back with an error trace. ``optimize=True`` in
        ``kwargs`` runs onnxscript's full optimizer instead of the constant folding.

        Raises:
            NotCalibratedError: When the model has not been fitted: its exported scores would be meaningless.

        """
        self.model.require_calibration("export")  # type: ignore[attr-defined]
        kwargs.setdefault("opset_version", ONNX_OPSET)
        full_optimizer = bool(kwargs.pop("optimize", False))
        with out_of_place_activations(self), quiet_constant_folding():  # type: ignore[arg-type]
            path = super().to_onnx(  # type: ignore[misc]
                export_root, model_file_name, input_size, optimize=full_optimizer, **kwargs
            )
            if not full_optimizer:
                fold_onnx_constants(path)
        return path

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Anomalib's torch export, of a fitted model only.

        Raises:
            NotCalibratedError: When the model has not been fitted.

        """
        self.model.require_calibration("export")  # type: ignore[attr-defined]
        return super().to_torch(export_root, model_file_name)  # type: ignore[misc]

    def _post_training_quantization_ov(
        self,
        model: ov.Model,
        datamodule: AnomalibDataModule | None = None,
    ) -> ov.Model:
        """INT8 encoder and flows, calibrated on the datamodule's training images; the scoring tail stays FP32.

        Raises:
            ConfigurationError: Without a datamodule.

        """
        if datamodule is None:
            msg = "INT8_PTQ needs a datamodule: its training images calibrate the quantization."
            raise ConfigurationError(msg)
        calibration = calibration_dataset(model, datamodule)
        return quantize(model, calibration, ("encoder", "flows"), decoder_weights(self.model.decoders))

    def _accuracy_control_quantization_ov(
        self,
        model: ov.Model,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | str | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
    ) -> ov.Model:
        """INT8 as far as the validation metric allows: each of :data:`ACCURACY_CONTROL_STAGES` in turn.

        ``metric`` (an anomalib metric, or the name of one in :data:`METRIC_FIELDS`, e.g. ``--metric AUROC``;
        default image AUROC, but ``Engine.export`` passes image F1) is computed on the validation split for the
        FP32 model and for each stage's quantized model; the first stage that loses at most ``max_drop``
        (absolute) is returned. If none does, the FP32 model is returned, with a warning.

        A label metric such as F1 is brittle here: anomalib's adaptive threshold sits exactly on one validation
        image's score, whose label then flips under any perturbation, so one image's worth of F1 is lost even
        when nothing else changes. Ranking metrics (AUROC) do not have this tie.

        Raises:
            ConfigurationError: Without a datamodule, or with ``max_drop`` outside ``[0, 1]`` or an unknown metric.

        """
        del task
        if datamodule is None:
            msg = "INT8_ACQ needs a datamodule: training images calibrate, the validation split checks accuracy."
            raise ConfigurationError(msg)
        if not 0 <= max_drop <= 1:
            msg = f"max_drop must lie in [0, 1], got {max_drop}."
            raise ConfigurationError(msg)
        metric = resolve_metric(metric)
        validate = validation_function(metric, datamodule, input_resizer(model.input(0).get_partial_shape()))
        metric_name = getattr(metric, "name", type(metric).__name__)
        reference = validate(model)
        calibration = calibration_dataset(model, datamodule)
        flow_weights = decoder_weights(self.model.decoders)
        for int8_regions in ACCURACY_CONTROL_STAGES:
            quantized = quantize(model, calibration, int8_regions, flow_weights)
            value = validate(quantized)
            regions = " and ".join(int8_regions)
            logger.info("INT8_ACQ, %s in INT8: %s %.4f (FP32 %.4f).", regions, metric_name, value, reference)
            if reference - value <= max_drop:
                return quantized
        logger.warning(
            "INT8_ACQ: every INT8 stage lost more than max_drop=%s of %s; the model stays FP32. Label metrics lose an "
            "image's worth at any perturbation (the adaptive threshold sits on a validation score); a ranking metric "
            "such as --metric AUROC does not.",
            max_drop,
            metric_name,
        )
        return model
