"""The export mixin's pieces: out-of-place tracing and the INT8 hooks' staging."""

from types import SimpleNamespace

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import torch
from torch import nn

from anomalib_cflow_plus import export
from anomalib_cflow_plus.export import out_of_place_activations


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


class _StagedQuantization:
    """Stand-ins for quantize/validate: each stage's model is its regions, each has a given metric."""

    def __init__(self, metrics):
        self.metrics = metrics  # {"fp32": value, ("encoder", "flows"): value, ("flows",): value}
        self.quantized = []

    def quantize(self, model, calibration, int8_regions, flow_weights=None):
        assert [weight.shape for weight in flow_weights] == [(2, 3)]  # the decoders' Linear weights
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
    mixin = export.CflowPlusExportMixin()
    mixin.model = SimpleNamespace(decoders=nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    result = mixin._accuracy_control_quantization_ov(model, datamodule=object(), metric=object(), max_drop=0.01)
    assert result is model if expected == "fp32" else result == expected
    assert len(staged.quantized) == tried


def test_accuracy_control_rejects_a_bad_max_drop():
    with pytest.raises(ValueError, match="max_drop"):
        export.CflowPlusExportMixin()._accuracy_control_quantization_ov(None, datamodule=object(), max_drop=2)
