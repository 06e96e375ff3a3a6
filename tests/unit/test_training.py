"""Training without Lightning: the recipes, the fiber sub-batch plan and the learning-rate schedule."""

import math

import pytest
import torch

from anomalib_cflow_plus.training import TRAINING_RECIPES, fiber_plan, warmup_cosine_schedule


def test_the_recipes_say_how_they_step():
    assert not TRAINING_RECIPES["paper"].joint_layers
    assert TRAINING_RECIPES["fast"].joint_layers


def test_schedule_warms_up_then_decays():
    factor = warmup_cosine_schedule(total_steps=100, warmup_fraction=0.1)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5 * (1 + 1e-3), rel=1e-3)
    assert factor(99) < 0.01
    assert warmup_cosine_schedule(math.inf, 0.1)(10**6) == 1.0


def test_paper_plan_covers_every_fiber_once_in_sub_batches_of_n():
    positions, images = [250, 60, 15], 4  # 1000, 240 and 60 fibers
    plan = fiber_plan(positions, images, 128, joint_layers=False, generator=torch.Generator().manual_seed(0))
    assert len(plan) == 8 + 2 + 1 and all(len(step) == 1 for step in plan)
    for layer, count in enumerate(positions):
        chunks = [index for step in plan for step_layer, index in step if step_layer == layer]
        assert max(len(chunk) for chunk in chunks) <= 128
        assert sorted(torch.cat(chunks).tolist()) == list(range(images * count))  # every flat fiber once


def test_joint_plan_trains_every_decoder_per_step_on_shared_positions():
    positions, images = [250, 60, 15], 4
    plan = fiber_plan(positions, images, 128, joint_layers=True, generator=torch.Generator().manual_seed(0))
    assert len(plan) == 8  # ceil(4 * 250 / 128) steps, each training all three decoders
    assert all([layer for layer, _ in step] == [0, 1, 2] for step in plan)
    for layer, count in enumerate(positions):
        chunks = [index for step in plan for step_layer, index in step if step_layer == layer]
        assert set(torch.cat(chunks).tolist()) == set(range(count))  # every position, hence every fiber
        assert max(images * len(chunk) for chunk in chunks) <= 128


def test_fiber_plan_is_reproducible_from_its_generator():
    def plan():
        return fiber_plan([300, 80], 2, 64, joint_layers=True, generator=torch.Generator().manual_seed(7))

    first, second = plan(), plan()
    for step_a, step_b in zip(first, second, strict=True):
        for (_, a), (_, b) in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)


def test_resize_size_is_fixed_only_for_a_height_and_width():
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_cflow_plus.training import resize_size

    def pre_processor(resize):
        return PreProcessor(transform=Compose([resize, Normalize(mean=[0.5] * 3, std=[0.2] * 3)]))

    assert resize_size(pre_processor(Resize((128, 320)))) == (128, 320)
    # Resize(S) scales the shorter edge: a 2:5 image becomes S x 2.5 S, so the size is not known in advance
    assert resize_size(pre_processor(Resize(256))) is None
    assert resize_size(pre_processor(Resize([256]))) is None
    assert resize_size(PreProcessor(transform=Normalize(mean=[0.5] * 3, std=[0.2] * 3))) is None
