"""Under autocast, the subnets' products run in reduced precision and everything a score depends on in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomalib_cflow_plus.calibration import calibrate
from anomalib_cflow_plus.precision import float32_region
from anomalib_cflow_plus.torch_model import CflowPlusModel

REDUCED = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def model() -> CflowPlusModel:
    """A small calibrated model whose subnets are not the identity (their last layers start at zero)."""
    torch.manual_seed(0)
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=2, condition_vector=16).eval()
    for module in model.decoders.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.05)
    calibrate(model, [torch.rand(2, 3, 64, 64) for _ in range(2)], torch.device("cpu"))
    return model


@pytest.mark.parametrize("dtype", REDUCED)
def test_scores_under_autocast_are_the_float32_scores(model: CflowPlusModel, dtype: torch.dtype) -> None:
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        with torch.autocast("cpu", dtype=dtype):
            actual = model(images)
    assert actual.pred_score.dtype == actual.anomaly_map.dtype == torch.float32
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=0, rtol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", REDUCED)
def test_calibration_under_autocast_is_the_float32_calibration(model: CflowPlusModel, dtype: torch.dtype) -> None:
    images = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(index)) for index in range(2)]
    calibrate(model, images, torch.device("cpu"))
    expected = {name: value.clone() for name, value in model.anomaly_map.state_dict().items()}
    with torch.autocast("cpu", dtype=dtype):
        calibrate(model, images, torch.device("cpu"))
    for name, value in model.anomaly_map.state_dict().items():
        assert value.dtype == expected[name].dtype, name
        assert torch.equal(value, expected[name]), name
    assert model.anomaly_map.layer_max.dtype == torch.float32


@pytest.mark.parametrize("dtype", REDUCED)
def test_training_runs_the_subnets_products_reduced_and_the_likelihood_in_float32(
    model: CflowPlusModel, dtype: torch.dtype
) -> None:
    features = model.encode(torch.rand(2, 3, 64, 64))
    fibers, condition = model.fibers(features[0])
    product_dtypes = set()
    hooks = [
        module.register_forward_hook(lambda _module, _inputs, output: product_dtypes.add(output.dtype))
        for module in model.decoders[0].modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        expected = model.fiber_log_likelihood(0, fibers, condition.select(torch.arange(fibers.shape[1])))
        product_dtypes.clear()
        with torch.autocast("cpu", dtype=dtype):
            actual = model.fiber_log_likelihood(0, fibers, condition.select(torch.arange(fibers.shape[1])))
    finally:
        for hook in hooks:
            hook.remove()
    assert product_dtypes == {dtype}  # every Linear of the decoder ran in reduced precision
    assert actual.dtype == torch.float32
    difference = (actual - expected).abs().max().item()
    assert 0 < difference < 0.05  # rounded products, an affine map and a log-det in float32


@pytest.mark.parametrize("dtype", REDUCED)
def test_encoder_features_stay_float32_under_autocast(model: CflowPlusModel, dtype: torch.dtype) -> None:
    images = torch.rand(1, 3, 64, 64)
    expected = model.encode(images)
    with torch.autocast("cpu", dtype=dtype):
        actual = model.encode(images)
    for expected_layer, actual_layer in zip(expected, actual, strict=True):
        assert actual_layer.dtype == torch.float32
        assert torch.equal(actual_layer, expected_layer)


def test_float32_region_turns_autocast_off_only_where_it_is_on() -> None:
    reference = torch.zeros(1)
    with float32_region(reference):
        assert not torch.is_autocast_enabled("cpu")
        assert (reference @ reference[:, None]).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (reference @ reference[:, None]).dtype == torch.bfloat16
        with float32_region(reference):
            assert (reference @ reference[:, None]).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")  # restored on the way out
    with float32_region(torch.zeros(1, device="meta")):  # no autocast on the meta device: nothing to turn off
        pass


@pytest.mark.parametrize("dtype", REDUCED)
def test_a_coupling_maps_and_sums_its_log_det_in_the_fibers_dtype(model: CflowPlusModel, dtype: torch.dtype) -> None:
    coupling = model.decoders[0][1]
    channels = model.encoder.out_dims[0]
    fibers, condition = torch.randn(5, channels), torch.randn(5, model.condition_vector)
    with torch.autocast("cpu", dtype=dtype):
        (latents,), log_det = coupling((fibers,), c=[condition])
    assert latents.dtype == log_det.dtype == torch.float32
