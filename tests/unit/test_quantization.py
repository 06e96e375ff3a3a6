"""INT8 quantization's pieces: the graph's regions (found by the flows' weights), calibration inputs, metrics."""

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import torch
from anomalib.data import ImageBatch
from torch import nn

from anomalib_cflow_plus.quantization import (
    ModelInputs,
    cpu_inference_config,
    decoder_weights,
    fp32_tail_names,
    graph_regions,
    is_quantized,
    resolve_metric,
)


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
    assert set(regions.flow_matmuls) == {"first", "subnet"}
    assert set(regions.tail) == {"square", "exp", "score", "label"}
    assert fp32_tail_names(_flow_like_model()) == list(regions.tail)


def test_fp32_names_are_the_tail_the_regions_left_out_of_int8_and_the_flows_between_products():
    regions = graph_regions(_flow_like_model())
    # INT8 flows quantize the subnets' products alone; what lies between them (here the ReLU) stays FP32.
    assert set(regions.fp32(["encoder", "flows"])) == {*regions.tail, "hidden"}
    assert set(regions.fp32(["flows"])) == {*regions.tail, "encoder", "hidden"}
    assert set(regions.fp32(["encoder"])) == {*regions.tail, *regions.flows}
    assert set(regions.fp32([])) == {*regions.tail, *regions.encoder, *regions.flows}
    with pytest.raises(ValueError, match="tail"):
        regions.fp32(["tail"])


def test_fp32_tail_needs_a_matmul():
    image = ops.parameter([-1, 4], np.float32, name="image")
    model = ov.Model([ops.exp(image)], [image])
    with pytest.raises(ValueError, match="flow MatMul"):
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


def test_resolve_metric_by_name_with_fields():
    assert resolve_metric(None).fields == ["pred_score", "gt_label"]
    assert type(resolve_metric(None)).__name__ == "AUROC"
    assert resolve_metric("F1Score").fields == ["pred_label", "gt_label"]
    assert resolve_metric("AUPRO").fields == ["anomaly_map", "gt_mask"]
    metric = resolve_metric("AUPR")
    assert resolve_metric(metric) is metric
    with pytest.raises(ValueError, match="AUROC"):
        resolve_metric("accuracy")


FLOW_WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4)  # a decoder's Linear(4 -> 3) weight


def _encoder_with_a_matmul() -> ov.Model:
    """An encoder with its own MatMul (as a ConvNeXt's or a ViT's MLP) -> a flow MatMul -> a score."""
    image = ops.parameter([-1, 4], np.float32, name="image")
    mlp = ops.matmul(image, ops.constant(np.full((4, 4), 0.5, np.float32)), False, False, name="encoder_mlp")
    features = ops.relu(mlp, name="encoder_act")
    latent = ops.matmul(features, ops.constant(FLOW_WEIGHT), False, True, name="flow")  # x @ W.T, as torch's Linear
    score = ops.reduce_sum(
        ops.multiply(latent, latent, name="square"), ops.constant(np.array([1])), False, name="score"
    )
    return ov.Model([score], [image])


def test_the_flows_are_found_by_their_weights_whatever_the_encoder_holds():
    regions = graph_regions(_encoder_with_a_matmul(), [FLOW_WEIGHT])
    assert set(regions.encoder) == {"encoder_mlp", "encoder_act"}
    assert set(regions.flows) == {"flow"}
    assert set(regions.tail) == {"square", "score"}
    # without the weights every MatMul is a landmark, and the encoder's MLP would count as a flow
    assert "encoder_mlp" in graph_regions(_encoder_with_a_matmul()).flows


def test_no_flow_weight_in_the_graph_is_an_error():
    with pytest.raises(ValueError, match="flow MatMul"):
        graph_regions(_encoder_with_a_matmul(), [np.zeros((5, 5), np.float32)])


def test_decoder_weights_are_the_linear_weights():
    decoders = nn.ModuleList([nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), nn.Linear(2, 2)])
    shapes = [weight.shape for weight in decoder_weights(decoders)]
    assert shapes == [(3, 4), (2, 3), (2, 2)]
    assert all(weight.dtype == np.float32 for weight in decoder_weights(decoders))


def test_int8_models_get_the_f32_hint_on_the_cpu(tmp_path):
    model = _flow_like_model()
    assert not is_quantized(model)
    assert cpu_inference_config(model) == {}
    image = model.get_parameters()[0]
    low, high = ops.constant(np.float32(-1.0)), ops.constant(np.float32(1.0))
    quantized = ov.Model([ops.fake_quantize(image, low, high, low, high, 256)], [image])
    ov.save_model(quantized, tmp_path / "int8.xml")
    assert is_quantized(quantized)
    assert cpu_inference_config(tmp_path / "int8.xml") == {"INFERENCE_PRECISION_HINT": "f32"}
