"""The export mixin's pieces: out-of-place tracing, the FP32 scoring tail, calibration inputs."""

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import torch
from anomalib.data import ImageBatch
from torch import nn

from anomalib_cflow_plus import export
from anomalib_cflow_plus.export import (
    ModelInputs,
    fp32_tail_names,
    graph_regions,
    out_of_place_activations,
    resolve_metric,
)


def test_out_of_place_activations_switches_and_restores():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.ReLU())
    x = torch.randn(2, 3, 5, 5)
    expected = module(x)
    with out_of_place_activations(module) as switched:
        assert switched == 2
        assert [layer.inplace for layer in module[1:]] == [False, False, False]
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    assert [layer.inplace for layer in module[1:]] == [True, True, False]


def test_out_of_place_activations_restores_after_an_error():
    module = nn.Sequential(nn.ReLU(inplace=True))
    with pytest.raises(RuntimeError), out_of_place_activations(module):
        raise RuntimeError
    assert module[0].inplace


def _flow_like_model() -> ov.Model:
    """encoder-ish Add -> two MatMuls (a "flow") -> Exp -> ReduceSum (a "score"), plus a side branch."""
    image = ops.parameter([-1, 4], np.float32, name="image")
    encoded = ops.add(image, ops.constant(np.ones((1, 4), np.float32)), name="encoder")
    first = ops.matmul(encoded, ops.constant(np.ones((4, 4), np.float32)), False, False, name="first")
    hidden = ops.relu(first, name="hidden")
    latent = ops.matmul(hidden, ops.constant(np.ones((4, 3), np.float32)), False, False, name="subnet")
    likelihood = ops.exp(ops.multiply(latent, latent, name="square"), name="exp")
    score = ops.reduce_sum(likelihood, ops.constant(np.array([1])), False, name="score")
    label = ops.greater(score, ops.constant(np.float32(0.5)), name="label")
    return ov.Model([score, label], [image])


def test_graph_regions_split_at_the_matmuls():
    regions = graph_regions(_flow_like_model())
    assert set(regions.encoder) == {"encoder"}
    assert set(regions.flows) == {"first", "hidden", "subnet"}
    assert set(regions.tail) == {"square", "exp", "score", "label"}
    assert fp32_tail_names(_flow_like_model()) == list(regions.tail)


def test_fp32_names_are_the_tail_and_the_regions_left_out_of_int8():
    regions = graph_regions(_flow_like_model())
    assert set(regions.fp32(["encoder", "flows"])) == set(regions.tail)
    assert set(regions.fp32(["flows"])) == {*regions.tail, "encoder"}
    assert set(regions.fp32([])) == {*regions.tail, *regions.encoder, *regions.flows}
    with pytest.raises(ValueError, match="tail"):
        regions.fp32(["tail"])


def test_fp32_tail_needs_a_matmul():
    image = ops.parameter([-1, 4], np.float32, name="image")
    model = ov.Model([ops.exp(image)], [image])
    with pytest.raises(ValueError, match="MatMul"):
        fp32_tail_names(model)


def _batches(sizes, height=6, width=6):
    return [ImageBatch(image=torch.rand(size, 3, height, width)) for size in sizes]


def test_model_inputs_resize_to_a_static_input_and_rebatch_to_a_static_batch():
    inputs = ModelInputs(_batches([3, 3, 1]), ov.PartialShape([2, 3, 4, 4]))
    arrays = list(inputs)
    assert [array.shape for array in arrays] == [(2, 3, 4, 4)] * 3  # 7 images -> three full batches of 2
    assert all(array.dtype == np.float32 for array in arrays)
    assert list(inputs) != [], "the inputs can be iterated again (NNCF passes over them more than once)"


def test_model_inputs_pass_dynamic_shapes_through():
    batches = _batches([3, 1])
    arrays = list(ModelInputs(batches, ov.PartialShape([-1, 3, -1, -1])))
    assert [array.shape for array in arrays] == [(3, 3, 6, 6), (1, 3, 6, 6)]
    np.testing.assert_array_equal(arrays[0], batches[0].image.numpy())


class _StagedQuantization:
    """Stand-ins for quantize/validate: each stage's model is its regions, each has a given metric."""

    def __init__(self, metrics):
        self.metrics = metrics  # {"fp32": value, ("encoder", "flows"): value, ("flows",): value}
        self.quantized = []

    def quantize(self, model, calibration, int8_regions):
        self.quantized.append(tuple(int8_regions))
        return tuple(int8_regions)

    def validation_function(self, metric, datamodule, resize):
        return lambda model: self.metrics[model if isinstance(model, tuple) else "fp32"]


@pytest.mark.parametrize(
    ("metrics", "expected", "tried"),
    [
        ({"fp32": 0.9, ("encoder", "flows"): 0.895, ("flows",): 0.9}, ("encoder", "flows"), 1),
        ({"fp32": 0.9, ("encoder", "flows"): 0.8, ("flows",): 0.9}, ("flows",), 2),
        ({"fp32": 0.9, ("encoder", "flows"): 0.8, ("flows",): 0.85}, "fp32", 2),
    ],
)
def test_accuracy_control_returns_the_first_stage_within_max_drop(monkeypatch, metrics, expected, tried):
    staged = _StagedQuantization(metrics)
    monkeypatch.setattr(export, "quantize", staged.quantize)
    monkeypatch.setattr(export, "validation_function", staged.validation_function)
    monkeypatch.setattr(export, "calibration_dataset", lambda model, datamodule: None)
    image = ops.parameter([-1, 3, 8, 8], np.float32, name="image")
    model = ov.Model([ops.relu(image)], [image])
    result = export.CflowPlusExportMixin()._accuracy_control_quantization_ov(
        model, datamodule=object(), metric=object(), max_drop=0.01
    )
    assert result is model if expected == "fp32" else result == expected
    assert len(staged.quantized) == tried


def test_accuracy_control_rejects_a_bad_max_drop():
    with pytest.raises(ValueError, match="max_drop"):
        export.CflowPlusExportMixin()._accuracy_control_quantization_ov(None, datamodule=object(), max_drop=2)


def test_resolve_metric_by_name_with_fields():
    assert resolve_metric(None).fields == ["pred_score", "gt_label"]
    assert type(resolve_metric(None)).__name__ == "AUROC"
    assert resolve_metric("F1Score").fields == ["pred_label", "gt_label"]
    assert resolve_metric("AUPRO").fields == ["anomaly_map", "gt_mask"]
    metric = resolve_metric("AUPR")
    assert resolve_metric(metric) is metric
    with pytest.raises(ValueError, match="AUROC"):
        resolve_metric("accuracy")
