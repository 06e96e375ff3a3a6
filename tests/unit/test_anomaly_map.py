import math

import pytest
import torch

from anomalib_cflow_plus.anomaly_map import AnomalyMapGenerator


def _maps(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, size, size, generator=generator) - 1.0 for size in (8, 4, 2)]


def test_paper_mode_map_and_score():
    generator = AnomalyMapGenerator(3, sigma=0, top_k_percent=0, score_mode="paper", image_score="map")
    generator.set_calibration(torch.zeros(3), torch.zeros(3), torch.ones(3))
    maps = [torch.zeros(1, 4, 4), torch.zeros(1, 2, 2), torch.zeros(1, 1, 1)]
    maps[0][0, 0, 0] = -math.log(2.0)  # half the likelihood of the best normal fiber
    anomaly_map, score = generator(maps, image_size=(4, 4))
    assert anomaly_map.shape == (1, 1, 4, 4)
    assert anomaly_map[0, 0, 3, 3].item() == pytest.approx(0.0, abs=1e-6)
    assert anomaly_map[0, 0, 0, 0].item() == pytest.approx(0.5, abs=1e-6)
    assert score.item() == pytest.approx(0.5, abs=1e-6)


def test_zscore_mode():
    generator = AnomalyMapGenerator(1, sigma=0, top_k_percent=0, score_mode="zscore", image_score="map")
    generator.set_calibration(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([0.5]))
    anomaly_map, score = generator([torch.full((1, 2, 2), -2.0)], image_size=(2, 2))
    torch.testing.assert_close(anomaly_map, torch.full((1, 1, 2, 2), 2.0))
    assert score.item() == pytest.approx(2.0)


def test_top_k_score_is_mean_of_largest_pixels():
    generator = AnomalyMapGenerator(1, sigma=0, top_k_percent=10.0)
    anomaly_map = torch.arange(100.0).reshape(1, 1, 10, 10)
    assert generator.image_score(anomaly_map).item() == pytest.approx(torch.arange(90.0, 100.0).mean().item())


def test_batch_independence_and_calibration_buffers():
    generator = AnomalyMapGenerator(3, sigma=4.0)
    generator.set_calibration(torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3), torch.ones(3))
    maps = _maps(batch=5)
    full_map, full_score = generator(maps, image_size=(32, 32))
    single_map, single_score = generator([m[2:3] for m in maps], image_size=(32, 32))
    torch.testing.assert_close(single_map[0], full_map[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(single_score[0], full_score[2], atol=1e-6, rtol=0)
    state = generator.state_dict()
    assert {"layer_max", "layer_mean", "layer_std", "calibrated"} <= set(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score_mode": "median"}, "score_mode"),
        ({"top_k_percent": 120}, "top_k_percent"),
        ({"sigma": -1}, "sigma"),
        ({"image_score": "mean"}, "image_score"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnomalyMapGenerator(3, **kwargs)


@pytest.mark.parametrize("score_mode", ["paper", "zscore"])
@pytest.mark.parametrize(("sigma", "image_size"), [(4.0, (64, 80)), (4.0, (40, 40)), (0.0, (24, 16)), (1.5, (17, 33))])
def test_map_equals_upsampling_each_layer_then_anomalibs_2d_gaussian(score_mode, sigma, image_size):
    # The reference is the map as written out: bilinear upsampling per layer, the sum, anomalib's 2-D blur.
    from anomalib.models.components import GaussianBlur2d
    from torch.nn import functional as F  # noqa: N812

    generator = AnomalyMapGenerator(3, sigma=sigma, score_mode=score_mode)
    generator.set_calibration(
        torch.tensor([0.5, 0.2, 0.1]), torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([1.0, 2.0, 0.5])
    )
    maps = [
        torch.randn(2, h, w, generator=torch.Generator().manual_seed(h)) - 1.0 for h, w in ((8, 10), (4, 5), (2, 3))
    ]
    upsampled = [
        F.interpolate(s, size=image_size, mode="bilinear", align_corners=False) for s in generator.layer_scores(maps)
    ]
    aggregate = torch.stack(upsampled).sum(dim=0)
    expected = 3 - aggregate if score_mode == "paper" else aggregate / 3
    if sigma > 0:
        expected = GaussianBlur2d(sigma=sigma, channels=1)(expected)
    anomaly_map, _ = generator(maps, image_size=image_size)
    assert anomaly_map.shape == (2, 1, *image_size)
    torch.testing.assert_close(anomaly_map, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.05  # not a flat map


def _one_hot_maps() -> list[torch.Tensor]:
    """Two layers of log-likelihoods: layer 0 has one fiber at half the best likelihood, layer 1 one at a quarter."""
    maps = [torch.zeros(1, 4, 4), torch.zeros(1, 2, 2)]
    maps[0][0, 0, 0] = -math.log(2.0)
    maps[1][0, 1, 1] = -math.log(4.0)
    return maps


def test_layer_max_score_averages_each_layers_most_anomalous_fiber():
    generator = AnomalyMapGenerator(2, sigma=0, score_mode="paper", image_score="layer_max")
    generator.set_calibration(torch.zeros(2), torch.zeros(2), torch.ones(2))
    _, score = generator(_one_hot_maps(), image_size=(4, 4))
    assert score.item() == pytest.approx((0.5 + 0.75) / 2, abs=1e-6)


def test_combined_score_is_mean_of_per_layer_map_max_and_layer_max():
    maps = _one_hot_maps()
    scores = {}
    for mode in ("map", "layer_max", "combined"):
        generator = AnomalyMapGenerator(2, sigma=0, top_k_percent=0, score_mode="paper", image_score=mode)
        generator.set_calibration(torch.zeros(2), torch.zeros(2), torch.ones(2))
        anomaly_map, scores[mode] = generator(maps, image_size=(4, 4))
        assert anomaly_map.shape == (1, 1, 4, 4)
    assert scores["combined"].item() == pytest.approx((scores["map"].item() / 2 + scores["layer_max"].item()) / 2)
    assert scores["combined"].item() != pytest.approx(scores["map"].item())


def test_combined_zscore_keeps_the_map_on_its_own_scale():
    generator = AnomalyMapGenerator(1, sigma=0, score_mode="zscore", image_score="combined")
    generator.set_calibration(torch.zeros(1), torch.zeros(1), torch.ones(1))
    log_likelihoods = torch.zeros(1, 2, 2)
    log_likelihoods[0, 0, 0] = -3.0
    _, score = generator([log_likelihoods], image_size=(2, 2))
    assert score.item() == pytest.approx(3.0)  # map max 3 and layer max 3


def test_batch_independence_of_every_image_score():
    maps = _maps(batch=4)
    for mode in ("map", "layer_max", "combined"):
        generator = AnomalyMapGenerator(3, sigma=4.0, image_score=mode)
        generator.set_calibration(torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3), torch.ones(3))
        _, full = generator(maps, image_size=(40, 40))
        _, single = generator([m[1:2] for m in maps], image_size=(40, 40))
        torch.testing.assert_close(single[0], full[1], atol=1e-6, rtol=0)


def _position_generator(image_score: str = "combined", sigma: float = 0.0) -> AnomalyMapGenerator:
    """One layer on a 4x4 grid whose position (0, 0) is normally unlikely and variable, and every other position
    likely and steady; calibrated for a position-calibrated image score."""
    generator = AnomalyMapGenerator(1, sigma=sigma, image_score=image_score)
    mean, std = torch.zeros(4, 4), torch.full((4, 4), 0.1)
    mean[0, 0], std[0, 0] = -5.0, 2.0
    generator.set_calibration(torch.tensor([0.0]), torch.tensor([-0.3]), torch.tensor([1.0]), [(mean, std)])
    return generator


def _good_and_defective() -> list[torch.Tensor]:
    good = torch.zeros(4, 4)
    good[0, 0] = -6.0  # half a std below its position's mean: ordinary there, the least likely fiber overall
    defective = torch.zeros(4, 4)
    defective[0, 0] = -5.0
    defective[2, 2] = -1.0  # ten stds below a steady position's mean
    return [torch.stack([good, defective])]


@pytest.mark.parametrize("image_score", ["combined", "map", "layer_max"])
def test_position_calibration_ranks_by_each_position_and_keeps_the_map(image_score):
    maps = _good_and_defective()
    layer = AnomalyMapGenerator(1, sigma=0.0, image_score=image_score)
    layer.set_calibration(torch.tensor([0.0]), torch.tensor([-0.3]), torch.tensor([1.0]))
    position = _position_generator(image_score)
    assert position.position_calibrated and not layer.position_calibrated
    layer_map, layer_score = layer(maps, image_size=(4, 4))
    position_map, position_score = position(maps, image_size=(4, 4))
    assert layer_score[0] > layer_score[1]  # one constant per layer: the good image's (0, 0) looks worst
    assert position_score[1] > position_score[0]  # against each position's own statistics the defect does
    torch.testing.assert_close(position_map, layer_map, rtol=0, atol=0)  # the map is the layer calibration's
    if image_score == "layer_max":  # the z-score of each image's most anomalous position
        torch.testing.assert_close(position_score, torch.tensor([0.5, 10.0]))


def test_position_calibration_is_batch_independent_and_resizes_onto_other_grids():
    generator = _position_generator(sigma=1.0)
    maps = _maps(batch=4)[:1]
    _, scores = generator(maps, image_size=(16, 16))
    for index in range(4):
        _, single = generator([maps[0][index : index + 1]], image_size=(16, 16))
        torch.testing.assert_close(single[0], scores[index], rtol=0, atol=1e-6)
    steady = AnomalyMapGenerator(1, sigma=0.0, image_score="layer_max")  # constant statistics resize to themselves
    steady.set_calibration(torch.zeros(1), torch.zeros(1), torch.ones(1), [(torch.ones(4, 4), torch.full((4, 4), 2.0))])
    values = torch.randn(3, 8, 8)
    _, scores = steady([values], image_size=(16, 16))
    torch.testing.assert_close(scores, ((1.0 - values) / 2.0).flatten(1).amax(1))


def test_position_statistics_travel_in_the_state_dict_at_their_grid_size():
    generator = _position_generator()
    state = generator.state_dict()
    assert state["position_mean_0"].shape == (4, 4)
    restored = AnomalyMapGenerator(1, sigma=0.0)
    assert not restored.position_calibrated
    restored.load_state_dict(state)
    maps = _good_and_defective()
    torch.testing.assert_close(restored(maps, (4, 4))[1], generator(maps, (4, 4))[1], rtol=0, atol=0)
    older = {key: value for key, value in state.items() if not key.startswith("position_")}
    restored.load_state_dict(older)  # a checkpoint from before position statistics: the layer calibration
    assert not restored.position_calibrated
