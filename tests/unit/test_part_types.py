"""One model of several part types: recognition, type-conditioned decoders, per-type calibration, mixed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skimage_data

from anomalib_cflow_plus.calibration import calibrate
from anomalib_cflow_plus.errors import ConfigurationError
from anomalib_cflow_plus.part_types import PartTypeRecognizer, image_descriptors
from anomalib_cflow_plus.torch_model import CflowPlusModel
from anomalib_cflow_plus.training import DecoderTraining

SIZE = 64


def texture_crops(name: str, count: int, seed: int) -> torch.Tensor:
    """``count`` random ``SIZE``-px RGB crops ``(count, 3, SIZE, SIZE)`` of a scikit-image texture photograph."""
    picture = getattr(skimage_data, name)()
    picture = np.stack([picture] * 3, axis=-1) if picture.ndim == 2 else picture[..., :3]
    generator = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        top, left = (generator.integers(0, side - 2 * SIZE) for side in picture.shape[:2])
        crop = picture[top : top + 2 * SIZE : 2, left : left + 2 * SIZE : 2]  # half resolution
        crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255)
    return torch.stack(crops)


def normalized(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (images - mean[:, None, None]) / std[:, None, None]


@pytest.fixture(scope="module")
def two_type_model() -> tuple[CflowPlusModel, dict[str, torch.Tensor]]:
    """A lite0 model of two part types (brick, grass), briefly trained and calibrated, and held-out images of each."""
    from anomalib_cflow_plus.backbones import load_encoder_weights, packaged_state_dict

    torch.manual_seed(0)
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=2, condition_vector=16)
    load_encoder_weights(model.feature_encoder, packaged_state_dict("efficientnet_lite0"), "efficientnet_lite0")
    model.set_part_types(["brick", "grass"])
    train = {name: normalized(texture_crops(name, 12, seed=0)) for name in ("brick", "grass")}
    images = torch.cat(list(train.values()))
    part_type = torch.tensor([0] * 12 + [1] * 12)
    training = DecoderTraining(model, fiber_batch_size=256, joint_layers=True, max_skipped_steps=5)
    optimizer = torch.optim.Adam(model.decoders.parameters(), lr=1e-3)
    for _ in range(15):
        training(images, optimizer, part_type=part_type)
    calibrate(model, [(train["brick"], part_type[:12]), (train["grass"], part_type[12:])], torch.device("cpu"))
    held_out = {name: normalized(texture_crops(name, 6, seed=1)) for name in ("brick", "grass", "gravel", "coffee")}
    return model.eval(), held_out


def test_descriptors_are_unit_vectors_per_image_and_average_tiles():
    features = [torch.rand(4, 8, 4, 4), torch.rand(4, 16, 2, 2)]
    descriptors = image_descriptors(features)
    assert descriptors.shape == (4, 24)
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(image_descriptors([f[:1] for f in features]), descriptors[:1])  # per image
    tiled = image_descriptors(features, per_image=2)  # 2 images of 2 tiles each
    assert tiled.shape == (2, 24)
    expected = torch.nn.functional.normalize(descriptors[:2].mean(dim=0), dim=0)
    torch.testing.assert_close(tiled[0], expected)


def test_the_recognizer_picks_the_nearest_prototype_and_keeps_its_names_in_the_state_dict():
    recognizer = PartTypeRecognizer(3)
    recognizer.set_names(["a", "b"])
    recognizer.set_prototypes(torch.tensor([[2.0, 0, 0], [0, 0, 5.0]]))
    assert recognizer(torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.0, 0.9]])).tolist() == [0, 1]
    restored = PartTypeRecognizer(3)
    restored.load_state_dict(recognizer.state_dict())
    assert restored.names == ["a", "b"] and torch.equal(restored.prototypes, recognizer.prototypes)
    with pytest.raises(ValueError, match="distinct"):
        recognizer.set_names(["a", "a"])


def test_each_type_is_recognized_from_the_image_alone(two_type_model):
    model, held_out = two_type_model
    assert model.evidence(held_out["brick"]).part_type.tolist() == [0] * 6
    assert model.evidence(held_out["grass"]).part_type.tolist() == [1] * 6


def test_a_mixed_batch_scores_each_image_as_alone(two_type_model):
    model, held_out = two_type_model
    mixed = torch.cat([held_out["brick"][:3], held_out["grass"][:3], held_out["gravel"][:2]])[torch.randperm(8)]
    with torch.no_grad():
        together = model(mixed)
        alone = [model(image[None]) for image in mixed]
    torch.testing.assert_close(together.pred_score, torch.cat([a.pred_score for a in alone]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together.anomaly_map, torch.cat([a.anomaly_map for a in alone]), atol=1e-4, rtol=1e-4)


def test_the_decoders_depend_on_the_part_type(two_type_model):
    model, held_out = two_type_model
    features = model.encode(held_out["brick"][:2])
    with torch.no_grad():
        as_brick = model.log_likelihood_maps(features, torch.tensor([0, 0]))
        as_grass = model.log_likelihood_maps(features, torch.tensor([1, 1]))
    assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(as_brick, as_grass, strict=True))
    assert float(as_brick[0].mean()) > float(as_grass[0].mean())  # brick's features are likelier as brick


def test_the_calibration_is_per_type_and_standardizes_each_types_training_scores(two_type_model):
    model, _ = two_type_model
    generator = model.anomaly_map
    assert generator.layer_max.shape == (2, 3) and not torch.equal(generator.layer_max[0], generator.layer_max[1])
    for index, name in enumerate(("brick", "grass")):
        with torch.no_grad():
            scores = model(normalized(texture_crops(name, 12, seed=0))).pred_score
        assert abs(float(scores.mean())) < 1e-3, name  # the training images' own scores: mean 0 ...
        assert float(scores.std(unbiased=False)) == pytest.approx(1.0, rel=1e-3), name  # ... and std 1
        assert float(generator.score_scale[index]) > 0


def test_an_unseen_type_scores_above_every_trained_types_good_images(two_type_model):
    """A coffee cup (scikit-image's photograph) in a model of brick and grass: beyond the novelty margin, it outscores
    every good image. Gravel, at 64 px a texture 3 to 5 stds from grass, lies within the margin (see NOVELTY_MARGIN)."""
    model, held_out = two_type_model
    with torch.no_grad():
        good = torch.cat([model(held_out[name]).pred_score for name in ("brick", "grass")])
        unseen = model(held_out["coffee"]).pred_score
        evidence = model.evidence(held_out["coffee"])
        novelty = model.part_types.novelty(evidence.descriptors, evidence.part_type)
    assert bool((novelty > 0).all())
    assert float(unseen.min()) > float(good.max())


def test_a_state_dict_carries_the_types_into_a_fresh_model(two_type_model):
    model, held_out = two_type_model
    fresh = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=2, condition_vector=16)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert fresh.part_types.names == ["brick", "grass"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(held_out["grass"]).pred_score, model(held_out["grass"]).pred_score)


def test_a_single_type_state_dict_loads_into_a_model_that_had_types():
    single = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1, condition_vector=16)
    typed = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1, condition_vector=16)
    typed.set_part_types(["a", "b"])
    state = {key: value for key, value in single.state_dict().items() if "part_types" not in key and "type" not in key}
    typed.load_state_dict(state)  # e.g. a checkpoint older than part types
    assert typed.part_types.count == 0 and typed.anomaly_map.part_types == 0
    assert typed.anomaly_map.layer_max.shape == (3,)


def test_training_a_typed_model_needs_the_types():
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1, condition_vector=16)
    model.set_part_types(["a", "b"])
    training = DecoderTraining(model, fiber_batch_size=64, joint_layers=True, max_skipped_steps=5)
    with pytest.raises(ValueError, match="MultiCategory"):
        training(torch.rand(2, 3, 64, 64), torch.optim.Adam(model.decoders.parameters()))


def test_a_fitted_model_refuses_to_go_on_fitting_on_other_types(two_type_model):
    model, _ = two_type_model
    model.adopt_part_types(["brick", "grass"], fitting=True)  # the same: nothing changes
    assert model.calibrated
    with pytest.raises(ConfigurationError, match="fresh"):
        model.adopt_part_types(["screw", "tire"], fitting=True)
    model.adopt_part_types(["screw", "tire"], fitting=False)  # testing on other names keeps the model's own
    assert model.part_types.names == ["brick", "grass"]


def test_the_paper_recipe_conditions_each_flat_fiber_on_its_images_type():
    torch.manual_seed(0)
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1, condition_vector=16)
    model.set_part_types(["a", "b"])
    features = model.encode(torch.rand(2, 3, 64, 64))
    model.initialize_normalization(features)
    part_type = torch.tensor([0, 1])
    fibers, condition = model.fibers(features[0], part_type)  # (2, 64, C)
    index = torch.tensor([3, 64 + 3])  # position 3 of image 0, and of image 1
    picked = model.fiber_log_likelihood(0, fibers.flatten(end_dim=1)[index], condition.select(index))
    whole = model.log_likelihood_maps(features, part_type)[0].flatten(start_dim=1)  # (2, 64)
    torch.testing.assert_close(picked, whole[:, 3], atol=1e-5, rtol=1e-5)


def test_a_process_without_images_of_one_type_merges_and_a_type_without_any_is_named():
    torch.manual_seed(0)
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1, condition_vector=16)
    model.set_part_types(["a", "b"])
    only_a = [(torch.rand(2, 3, 64, 64), torch.tensor([0, 0]))]
    merged = []

    def two_processes(values: torch.Tensor, op: str) -> torch.Tensor:
        merged.append(tuple(values.shape))
        return values  # the other process: no image of "b" either

    with pytest.raises(RuntimeError, match=r"\['b'\]"):
        calibrate(model, only_a, torch.device("cpu"), reduce=two_processes)
    assert (8, 8) in merged  # "b"'s empty figures were merged on the grid of "a"'s


def test_each_types_fibers_leave_the_normalization_standardized_from_its_first_batch():
    torch.manual_seed(0)
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1, condition_vector=16)
    model.set_part_types(["dark", "bright"])
    images = torch.cat([torch.rand(2, 3, 64, 64) * 0.2, 0.8 + torch.rand(2, 3, 64, 64) * 0.2])
    part_type = torch.tensor([0, 0, 1, 1])
    training = DecoderTraining(model, fiber_batch_size=64, joint_layers=True, max_skipped_steps=5)
    training.initialize_type_normalization(model.encode(images), part_type)
    actnorm = model.normalizations[0]
    assert actnorm.type_initialized.tolist() == [True, True]
    fibers, condition = model.fibers(model.encode(images)[0], part_type)  # (4, h*w, C)
    (normalized_fibers,), _ = actnorm((fibers,), c=[condition])
    for index in (0, 1):
        of_type = normalized_fibers[part_type == index].flatten(end_dim=1)
        torch.testing.assert_close(of_type.mean(dim=0), torch.zeros(of_type.shape[1]), atol=1e-3, rtol=0)
        torch.testing.assert_close(of_type.std(dim=0, unbiased=False), torch.ones(of_type.shape[1]), atol=2e-2, rtol=0)
