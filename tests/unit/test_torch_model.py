import pytest
import torch
from anomalib.data.utils.tiler import ImageUpscaleMode, Tiler

from anomalib_cflow_plus.calibration import calibrate
from anomalib_cflow_plus.condition import positional_encoding_2d
from anomalib_cflow_plus.errors import ConfigurationError, NotCalibratedError
from anomalib_cflow_plus.torch_model import CflowPlusModel, feature_levels, resolve_layers


@pytest.fixture(scope="module")
def model() -> CflowPlusModel:
    torch.manual_seed(0)
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=2)
    images = torch.randn(4, 3, 96, 96)
    model.initialize_normalization(model.encode(images))
    with torch.no_grad():  # non-trivial decoders, as after training
        for parameter in model.decoders.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    calibrate(model, [images], torch.device("cpu"))
    return model.eval()


def test_an_uncalibrated_model_refuses_to_score_and_to_export() -> None:
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1).eval()
    assert not model.calibrated
    with pytest.raises(NotCalibratedError, match=r"cannot score images: it has not been fitted.*calibrate\("):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(NotCalibratedError, match="cannot export"):
        model.require_calibration("export")
    calibrate(model, [torch.rand(2, 3, 64, 64)], torch.device("cpu"))
    assert model.calibrated
    assert model(torch.rand(1, 3, 64, 64)).pred_score.shape == (1,)


def test_default_layers_and_shapes(model):
    assert model.layers == ["blocks.2", "blocks.4", "blocks.6"]
    features = model.encode(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(2, 40, 8, 12), (2, 112, 4, 6), (2, 320, 2, 3)]
    maps = model.log_likelihood_maps(features)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 12), (2, 4, 6), (2, 2, 3)]


def test_fibers_follow_positions(model):
    features = torch.randn(2, 40, 3, 4)
    fibers, condition = model.fibers(features)
    assert fibers.shape == (2, 12, 40)
    dense = condition.dense()
    assert dense.shape == (12, 128)
    # the fiber of image 1 at row 2, column 3 sits at position 2*4 + 3, with that position's encoding
    torch.testing.assert_close(fibers[1, 2 * 4 + 3], features[1, :, 2, 3])
    torch.testing.assert_close(dense.T.reshape(128, 3, 4), positional_encoding_2d(128, 3, 4))
    # flat fibers picked by index keep their position's condition
    flat_index = torch.tensor([1 * 12 + 2 * 4 + 3, 5])
    torch.testing.assert_close(condition.select(flat_index).dense(), dense[[2 * 4 + 3, 5]])


@pytest.mark.parametrize("scored", ["model", "neighbourhood_model"])
def test_batch_independence(scored, request):
    model = request.getfixturevalue(scored)
    images = torch.randn(8, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    batch = model(images)
    for index in (0, 5):
        alone = model(images[index : index + 1])
        # calibrated scores of this random model reach ~7: float rounding of batched products, relative to them
        torch.testing.assert_close(alone.pred_score[0], batch.pred_score[index], atol=1e-5, rtol=3e-6)
        torch.testing.assert_close(alone.anomaly_map[0], batch.anomaly_map[index], atol=1e-5, rtol=0)
    assert batch.anomaly_map.shape == (8, 1, 128, 128)
    assert batch.pred_score.shape == (8,)


def test_encoder_stays_frozen_in_train_mode(model):
    model.train()
    try:
        assert not model.encoder.training
        assert all(not m.training for m in model.encoder.modules())
        assert all(d.training for d in model.decoders)
        bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
        before = bn.running_mean.clone()
        model.encode(torch.randn(2, 3, 64, 64) * 5)
        torch.testing.assert_close(bn.running_mean, before)
        features = model.encode(torch.randn(1, 3, 64, 64))
        assert not any(f.requires_grad for f in features)  # no graph reaches the encoder
    finally:
        model.eval()


def test_state_dict_carries_calibration_and_permutations(model):
    keys = set(model.state_dict())
    assert {"anomaly_map.layer_max", "anomaly_map.layer_mean", "anomaly_map.layer_std"} <= keys
    assert any(key.endswith("permutation") for key in keys)
    assert any(key.endswith("initialized") for key in keys)


def test_resolve_layers_errors_list_valid_names():
    levels = feature_levels("resnet18")
    assert resolve_layers("resnet18", None, levels) == ["layer1", "layer2", "layer3"]
    assert resolve_layers("resnet18", ["layer3", "layer1"], levels) == ["layer1", "layer3"]
    with pytest.raises(ValueError, match=r"Valid layers.*layer1"):
        resolve_layers("resnet18", ["layer9"], levels)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet_does_not_exist'"):
        CflowPlusModel(backbone="resnet_does_not_exist")


@pytest.mark.parametrize(
    ("backbone", "suggested"),
    [("resnt18", "the closest are: resnet18,"), ("efficientnet_lite", "efficientnet_lite1"), ("resnet", "resnet18")],
)
def test_unknown_backbone_lists_close_timm_names(backbone, suggested):
    with pytest.raises(ValueError, match="Unknown backbone") as error:
        CflowPlusModel(backbone=backbone)
    assert suggested in str(error.value)


def test_unknown_backbone_without_close_names_says_what_works_offline():
    with pytest.raises(ValueError, match="packaged ImageNet weights") as error:
        CflowPlusModel(backbone="not_a_model")
    assert "timm.list_models()" in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"condition_vector": 126}, "multiple of 4"),
        ({"coupling_blocks": 0}, "coupling_blocks"),
        ({"hidden_ratio": 0}, "hidden_ratio"),
        ({"tile_condition": "global"}, "tile_condition must be one of"),
    ],
)
def test_invalid_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CflowPlusModel(**kwargs)


def test_encoder_runs_channels_last_and_fibers_are_views():
    model = CflowPlusModel("resnet18", layers=["layer1", "layer2"]).eval()
    assert all(
        parameter.is_contiguous(memory_format=torch.channels_last)
        for parameter in model.encoder.parameters()
        if parameter.dim() == 4
    )
    model.encoder.load_state_dict(model.encoder.state_dict())  # loading weights keeps the layout
    assert model.encoder.feature_extractor.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    features = model.encode(torch.rand(2, 3, 64, 64))
    fibers, _ = model.fibers(features[0])
    assert fibers.is_contiguous() and fibers.data_ptr() == features[0].data_ptr()


@pytest.fixture
def tiled(model):
    """The module's model with a tiler set for one test, then removed."""

    def configure(tile_size, stride, condition="image"):
        model.tiler = Tiler(tile_size=tile_size, stride=stride)
        model.tile_condition = condition
        return model

    yield configure
    model.tiler = None
    model.tile_condition = "image"


@pytest.mark.parametrize("condition", ["image", "tile"])
def test_one_tile_covering_the_image_changes_nothing(model, tiled, condition):
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    expected = model(images)
    tiled((64, 96), (64, 96), condition)
    actual = model(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)


def test_image_condition_stitches_tile_features_into_the_whole_grid(model, tiled):
    images = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(3))
    whole = model.encode(images)
    tiled(64, 64, "image")
    stitched = model.encode(images)
    assert [f.shape for f in stitched] == [f.shape for f in whole]  # (2, C_l, 128 / s_l, 192 / s_l)
    # each tile's features are the encoder's features of that crop, at that crop's place in the grid
    crop = model.encoder(images[:, :, 64:128, 128:192])
    for layer, (tile_features, stride) in enumerate(zip(crop.values(), (8, 16, 32), strict=True)):
        rows, cols = slice(64 // stride, 128 // stride), slice(128 // stride, 192 // stride)
        torch.testing.assert_close(stitched[layer][:, :, rows, cols], tile_features)
    output = model(images)
    assert output.anomaly_map.shape == (2, 1, 128, 192)


def test_tile_condition_scores_tiles_alone_and_stitches_their_maps(model, tiled):
    images = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(4))
    tiled(64, 64, "tile")
    assert [f.shape[0] for f in model.encode(images)] == [12] * 3  # 2 images x 2 x 3 tiles
    output = model(images)
    assert output.anomaly_map.shape == (2, 1, 128, 192)
    # the bottom-right tile's log-likelihoods are those of the crop scored alone
    maps = model.log_likelihood_maps(list(model.encoder(images[:, :, 64:, 128:]).values()))
    tile_maps = model.log_likelihood_maps(model.encode(images))
    torch.testing.assert_close(tile_maps[0].reshape(2, 6, 8, 8)[:, 5], maps[0])
    # batch independence holds with tiles
    alone = model(images[1:])
    torch.testing.assert_close(alone.pred_score[0], output.pred_score[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("condition", ["image", "tile"])
def test_padding_of_tiles_that_do_not_fit_is_cut_off(model, tiled, condition):
    """160 x 224 in 64-px tiles is padded to 192 x 256; the maps cover the image alone, as without tiles."""
    images = torch.randn(1, 3, 160, 224, generator=torch.Generator().manual_seed(5))
    whole = [f.shape[-2:] for f in model.encode(images)]
    tiled(64, 64, condition)
    if condition == "image":
        assert [f.shape[-2:] for f in model.encode(images)] == whole  # (20, 28), (10, 14), (5, 7)
    maps = model.log_likelihood_maps(model.encode(images))
    if condition == "tile":
        maps = [model.untile(layer_map.unsqueeze(1)).squeeze(1) for layer_map in maps]
    assert [m.shape[-2:] for m in maps] == whole
    assert model(images).anomaly_map.shape == (1, 1, 160, 224)


@pytest.mark.parametrize(
    ("tiler", "match"),
    [
        (Tiler(tile_size=100, stride=100), "multiples of the encoder's stride 32"),
        (Tiler(tile_size=64, stride=48), "multiples of the encoder's stride 32"),
        (Tiler(tile_size=64, stride=64, remove_border_count=2), "no border removed"),
        (Tiler(tile_size=64, stride=64, mode=ImageUpscaleMode.INTERPOLATION), "PADDING only"),
    ],
)
def test_a_tiler_whose_tiles_cannot_line_up_is_refused(model, tiler, match):
    with pytest.raises(ValueError, match=match):
        model.tiler = tiler
    assert model.tiler is None


def test_the_docstring_example_runs():
    import doctest

    from anomalib_cflow_plus import torch_model

    result = doctest.testmod(torch_model)
    assert result.attempted > 0  # the examples are there and ran
    assert result.failed == 0


@pytest.fixture(scope="module")
def neighbourhood_model(model) -> CflowPlusModel:
    """The module's model with the same decoders, each fiber averaged with its 3x3 neighbourhood first."""
    context = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=2, neighbourhood=3)
    context.load_state_dict(model.state_dict())
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    calibrate(context, [images], torch.device("cpu"))
    return context.eval()


def test_neighbourhood_averages_each_fiber_with_the_fibers_around_it(model, neighbourhood_model):
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    alone, averaged = model.encode(images), neighbourhood_model.encode(images)
    assert [f.shape for f in averaged] == [f.shape for f in alone]
    for single, context in zip(alone, averaged, strict=True):
        torch.testing.assert_close(context[:, :, 1, 2], single[:, :, 0:3, 1:4].mean(dim=(-2, -1)))  # inside
        torch.testing.assert_close(context[:, :, 0, 0], single[:, :, 0:2, 0:2].mean(dim=(-2, -1)))  # corner: no pad
    maps, context_maps = model.log_likelihood_maps(alone), neighbourhood_model.log_likelihood_maps(averaged)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(maps, context_maps, strict=True))


def test_a_local_defect_spreads_over_its_neighbourhood(model, neighbourhood_model):
    """One changed fiber changes only itself alone, and its 3x3 neighbours with a neighbourhood."""
    features = torch.randn(1, 40, 6, 6, generator=torch.Generator().manual_seed(4))
    changed = features.clone()
    changed[0, :, 3, 3] += 5.0
    alone = (model.aggregate(changed) - model.aggregate(features)).abs().sum(1)[0] > 0
    context = (neighbourhood_model.aggregate(changed) - neighbourhood_model.aggregate(features)).abs().sum(1)[0] > 1e-6
    assert alone.sum() == 1
    assert context.sum() == 9
    assert context[2:5, 2:5].all()


@pytest.mark.parametrize("neighbourhood", [0, 2, -3])
def test_neighbourhood_must_be_odd_and_positive(neighbourhood):
    with pytest.raises(ConfigurationError, match=r"neighbourhood must be an odd number >= 1.*got"):
        CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1, neighbourhood=neighbourhood)
