"""INT8 quantization of an exported CflowPlus with NNCF, with the scoring tail kept in FP32.

The OpenVINO graph is split into three regions (:func:`graph_regions`): the encoder, the flows and the scoring
tail. The flows are found by their weights: a ``MatMul`` whose constant operand is one of the decoders' ``Linear``
weights is a flow subnet, whatever ops the encoder has (a ConvNeXt's or a ViT's MLPs are ``MatMul`` too).
:func:`quantize` quantizes the regions asked for; the tail (log-likelihood, ``exp``, upsampling, smoothing, score,
post-processing) always stays FP32, by an NNCF ignored scope: 8-bit steps there would erase the small likelihood
differences that the scores are made of.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .errors import ConfigurationError

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from torchmetrics import Metric

__all__ = [
    "ACCURACY_CONTROL_STAGES",
    "METRIC_FIELDS",
    "GraphRegions",
    "ModelInputs",
    "calibration_dataset",
    "cpu_inference_config",
    "decoder_weights",
    "fp32_tail_names",
    "graph_regions",
    "input_resizer",
    "is_quantized",
    "quantize",
    "quiet_nncf",
    "resolve_metric",
    "validation_function",
]

logger = logging.getLogger(__name__)

# OpenVINO op types that hold no computation: never quantized, never listed in an ignored scope.
_STRUCTURAL_OPS = frozenset({"Constant", "Parameter", "Result"})
# Ops that may sit between a weight constant and the MatMul that uses it (decompression, layout).
_WEIGHT_PATH_OPS = frozenset({"Convert", "Transpose", "Reshape", "Unsqueeze", "Squeeze"})
# INT8_ACQ tries these regions of the graph in INT8, in order, until the metric drop is within ``max_drop``.
# NNCF's own accuracy control ranks every quantizer by reverting it and recompiling the model: 154 groups
# took 17 minutes for one 256-px model on a 2-core CPU. Quantizing the encoder is what moves scores (flows
# alone in INT8 moved normalized scores by < 0.03 on the demo data), so one step back suffices.
ACCURACY_CONTROL_STAGES: tuple[tuple[str, ...], ...] = (("encoder", "flows"), ("flows",))
# Validation compares FP32 and INT8 at full precision: CPUs with bf16 otherwise run both in bf16.
_VALIDATION_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
# An INT8 model's FP32 parts run at f32 on bf16 CPUs too: faster than bf16 there (see cpu_inference_config).
_INT8_CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass(frozen=True)
class GraphRegions:
    """Friendly names of an exported CflowPlus's computing ops, by region.

    Attributes:
        encoder: Upstream of every flow subnet: pre-processing, encoder, fibers, ActNorms.
        flows: The flow subnets' ``MatMul`` ops and the ops between them (the couplings).
        tail: Downstream of every flow subnet: log-likelihood, ``exp``, upsampling, smoothing, score,
            post-processing. Always FP32.
        flow_matmuls: The flow subnets' ``MatMul`` ops alone, a subset of ``flows``.

    """

    encoder: tuple[str, ...]
    flows: tuple[str, ...]
    tail: tuple[str, ...]
    flow_matmuls: tuple[str, ...] = ()

    def fp32(self, int8_regions: Iterable[str]) -> list[str]:
        """Names of the ops to keep in FP32 for ``int8_regions`` (e.g. ``("flows",)``).

        The tail and any region not listed, and in INT8 flows every op but the subnets' matrix products: NNCF would
        otherwise also quantize the couplings' elementwise ops (the soft clamp, ``exp``, the affine update of the
        fibers), which costs a quantize and a dequantize pass each and rounds the fibers themselves to 8 bits.
        """
        keep = set(int8_regions)
        unknown = keep - {"encoder", "flows"}
        if unknown:
            msg = f"Unknown INT8 regions {sorted(unknown)}; choose among 'encoder' and 'flows'."
            raise ConfigurationError(msg)
        names = list(self.tail)
        if "encoder" not in keep:
            names.extend(self.encoder)
        matmuls = set(self.flow_matmuls) if "flows" in keep else set()
        names.extend(name for name in self.flows if name not in matmuls)
        return names


def graph_regions(model: ov.Model, flow_weights: Sequence[np.ndarray] | None = None) -> GraphRegions:
    """Split the ops of an exported CflowPlus into encoder, flows and scoring tail, at the flows' ``MatMul`` ops.

    The landmarks are the ``MatMul`` ops whose constant operand is one of ``flow_weights`` (the decoders'
    ``Linear`` weights, see :func:`decoder_weights`); with ``None``, every ``MatMul`` (right only for an encoder
    without ``MatMul``). An op is in the tail when no landmark depends on it, in the flows when it is a landmark or
    depends on one (and is not in the tail), in the encoder otherwise.
    """
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in _STRUCTURAL_OPS]
    matmuls = [op for op in ops if op.get_type_name() == "MatMul"]
    flow_ops = matmuls if flow_weights is None else [op for op in matmuls if _uses_weight(op, flow_weights)]
    if not flow_ops:
        msg = "The OpenVINO model has no flow MatMul: nothing tells the encoder from the scoring tail."
        raise ValueError(msg)
    feeding_flows = _reachable(flow_ops, lambda op: [source.get_source_output().get_node() for source in op.inputs()])
    fed_by_flows = _reachable(
        flow_ops, lambda op: [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]
    )
    names = [op.get_friendly_name() for op in ops]
    tail = tuple(name for name in names if name not in feeding_flows)
    flows = tuple(name for name in names if name in feeding_flows and name in fed_by_flows)
    encoder = tuple(name for name in names if name in feeding_flows and name not in fed_by_flows)
    flow_matmuls = tuple(op.get_friendly_name() for op in flow_ops)
    return GraphRegions(encoder=encoder, flows=flows, tail=tail, flow_matmuls=flow_matmuls)


def is_quantized(model: ov.Model) -> bool:
    """Whether an OpenVINO model holds NNCF's quantizers (``FakeQuantize`` ops), i.e. is an INT8 export."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def cpu_inference_config(model: ov.Model | str | Path) -> dict[str, str]:
    """OpenVINO CPU properties for an exported CflowPlus: ``{}`` for FP32, the ``f32`` hint for INT8.

    On CPUs with bf16, OpenVINO runs whatever is not INT8 in bf16 by default. In an INT8 CflowPlus that is the
    couplings' elementwise ops and the scoring tail, and converting between INT8, bf16 and f32 around every
    quantized product costs more than bf16 saves: with the ``f32`` hint, INT8 ran 1.20-1.23x faster than the FP32
    model at OpenVINO's defaults, and 1.11-1.12x at its own defaults (lite0, 256 px, batch 1 and 8, 2 threads;
    ``benchmarks/profile_openvino.py --time``). Pass the result as ``config`` to anomalib's ``OpenVINOInferencer``.
    """
    import openvino as ov

    if not isinstance(model, ov.Model):
        model = ov.Core().read_model(model)
    return dict(_INT8_CPU_CONFIG) if is_quantized(model) else {}


def decoder_weights(decoders: nn.Module) -> list[np.ndarray]:
    """Return the weight matrices ``(out, in)`` of every ``Linear`` in ``decoders``, as float32 arrays."""
    return [
        module.weight.detach().float().cpu().numpy() for module in decoders.modules() if isinstance(module, nn.Linear)
    ]


def _uses_weight(op: Any, weights: Sequence[np.ndarray]) -> bool:
    """Whether one of ``op``'s operands is a constant equal to one of ``weights`` (or to its transpose)."""
    for source in op.inputs():
        node = source.get_source_output().get_node()
        while node.get_type_name() in _WEIGHT_PATH_OPS:
            node = node.input(0).get_source_output().get_node()
        if node.get_type_name() != "Constant":
            continue
        value = np.asarray(node.get_data(), dtype=np.float32)
        for weight in weights:
            for candidate in (weight, weight.T):
                if value.shape == candidate.shape and np.allclose(value, candidate, rtol=1e-3, atol=1e-6):
                    return True
    return False


def _reachable(start: Iterable[Any], neighbours: Callable[[Any], Iterable[Any]]) -> set[str]:
    """Friendly names of the ops reachable from ``start`` (included) through ``neighbours``."""
    seen: set[str] = set()
    stack = list(start)
    while stack:
        op = stack.pop()
        name = op.get_friendly_name()
        if name not in seen:
            seen.add(name)
            stack.extend(neighbours(op))
    return seen


def fp32_tail_names(model: ov.Model, flow_weights: Sequence[np.ndarray] | None = None) -> list[str]:
    """Friendly names of the scoring tail's ops (see :class:`GraphRegions`)."""
    return list(graph_regions(model, flow_weights).tail)


def input_resizer(input_shape: ov.PartialShape) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function that brings images ``(B, 3, H, W)`` to the model's static input size, as float32 CPU.

    With a dynamic height or width the images keep their size. A datamodule that has served a model yields
    images at its pre-processor's size, which need not be the export's ``input_size``.
    """
    spatial = input_shape[2], input_shape[3]
    size = tuple(dim.get_length() for dim in spatial) if all(dim.is_static for dim in spatial) else None

    def resize(images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float().cpu()
        if size is not None and tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return images

    return resize


class ModelInputs:
    """Re-iterable image batches of a dataloader as the OpenVINO model's input: float32 arrays ``(B, 3, H, W)``.

    Images are resized to the model's static input size (:func:`input_resizer`) and re-batched to its batch
    size when that is static, so that any datamodule fits any export. NNCF iterates more than once.

    Args:
        dataloader: Yields anomalib batches with ``image`` ``(B, 3, H, W)`` in [0, 1].
        input_shape: The model's input partial shape, e.g. ``[?, 3, 256, 256]``.

    """

    def __init__(self, dataloader: Iterable[Any], input_shape: ov.PartialShape) -> None:
        self.dataloader = dataloader
        self.batch_size = input_shape[0].get_length() if input_shape[0].is_static else None
        self.resize = input_resizer(input_shape)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield ``(B, 3, H, W)`` float32 arrays."""
        pending: list[torch.Tensor] = []
        for batch in self.dataloader:
            images = self.resize(batch.image)
            if self.batch_size is None:
                yield images.numpy()
                continue
            pending.extend(images)
            while len(pending) >= self.batch_size:
                yield torch.stack(pending[: self.batch_size]).numpy()
                pending = pending[self.batch_size :]


# Fields of the metrics that INT8_ACQ accepts by name (``--metric AUROC``).
METRIC_FIELDS: dict[str, list[str]] = {
    "AUROC": ["pred_score", "gt_label"],
    "AUPR": ["pred_score", "gt_label"],
    "F1Max": ["pred_score", "gt_label"],
    "F1Score": ["pred_label", "gt_label"],
    "AUPRO": ["anomaly_map", "gt_mask"],
}


def resolve_metric(metric: Metric | str | None) -> Metric:
    """Return ``metric`` itself, the anomalib metric it names (AUPRO on the maps, others per image) or image AUROC."""
    import anomalib.metrics

    if metric is None:
        metric = "AUROC"
    if not isinstance(metric, str):
        return metric
    if metric not in METRIC_FIELDS:
        msg = f"Unknown metric {metric!r} for INT8_ACQ; choose one of {sorted(METRIC_FIELDS)} or pass a metric."
        raise ConfigurationError(msg)
    return getattr(anomalib.metrics, metric)(fields=METRIC_FIELDS[metric], strict=False)


def quantize(
    model: ov.Model,
    calibration: Any,
    int8_regions: Iterable[str],
    flow_weights: Sequence[np.ndarray] | None = None,
) -> ov.Model:
    """NNCF post-training quantization of ``int8_regions`` of ``model`` (``"encoder"``, ``"flows"``); the rest FP32.

    ``flow_weights`` locate the flows (see :func:`graph_regions`).
    """
    import nncf

    fp32_names = graph_regions(model, flow_weights).fp32(int8_regions)
    logger.info("INT8: %d of %d ops stay in FP32.", len(fp32_names), len(model.get_ops()))
    with quiet_nncf():
        return nncf.quantize(model.clone(), calibration, ignored_scope=nncf.IgnoredScope(names=fp32_names))


class _SkipIgnoredOpLines(logging.Filter):
    """Drop NNCF's "Not adding activation input quantizer" lines: one per op of the ignored scope."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every other record."""
        return not record.getMessage().startswith("Not adding activation input quantizer")


@contextmanager
def quiet_nncf() -> Iterator[None]:
    """Silence NNCF's line per ignored op (hundreds here) and keep its other messages."""
    nncf_logger = logging.getLogger("nncf")
    line_filter = _SkipIgnoredOpLines()
    nncf_logger.addFilter(line_filter)
    try:
        yield
    finally:
        nncf_logger.removeFilter(line_filter)


def calibration_dataset(model: ov.Model, datamodule: AnomalibDataModule) -> Any:
    """Wrap the datamodule's training images, shaped for ``model``'s input, as an ``nncf.Dataset``."""
    import nncf

    datamodule.setup("fit")
    return nncf.Dataset(ModelInputs(datamodule.train_dataloader(), model.input(0).get_partial_shape()))


def validation_function(
    metric: Metric,
    datamodule: AnomalibDataModule,
    resize: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[ov.Model], float]:
    """Return ``validate(model) -> float``: ``metric`` of an OpenVINO model on the validation split (CPU, f32).

    Ground-truth masks are resized (nearest) to the anomaly maps' size, as anomalib's pre-processor does.
    """
    import openvino as ov
    from anomalib.data import ImageBatch

    datamodule.setup("validate")
    core = ov.Core()

    def validate(model: ov.Model) -> float:
        compiled = core.compile_model(model, "CPU", _VALIDATION_CONFIG)
        names = [output.get_any_name() for output in compiled.outputs]
        metric.reset()
        for batch in datamodule.val_dataloader():
            images = resize(batch.image)
            outputs = compiled(images.numpy())
            predictions = {name: torch.from_numpy(np.asarray(outputs[name])) for name in names}
            anomaly_map = predictions.get("anomaly_map")
            gt_mask = batch.gt_mask
            if gt_mask is not None and anomaly_map is not None and gt_mask.shape[-2:] != anomaly_map.shape[-2:]:
                gt_mask = F.interpolate(gt_mask[:, None].float(), size=anomaly_map.shape[-2:], mode="nearest")[:, 0]
            metric.update(
                ImageBatch(
                    image=images,
                    gt_label=batch.gt_label,
                    gt_mask=None if gt_mask is None else gt_mask.bool(),
                    pred_score=predictions["pred_score"].flatten(),
                    pred_label=predictions["pred_label"].flatten().bool(),
                    anomaly_map=anomaly_map,
                    pred_mask=predictions.get("pred_mask"),
                )
            )
        return float(metric.compute())

    return validate
