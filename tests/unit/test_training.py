"""Training without Lightning: the recipes, the fiber sub-batch plan and the learning-rate schedule."""

import math
from types import SimpleNamespace

import pytest
import torch

from anomalib_cflow_plus.training import fiber_plan, warmup_cosine_schedule


def _decoders_per_optimizer_step(recipe: str) -> list[list[int]]:
    """Run one training step of a small CflowPlus; return, for each optimizer step, the decoders it updated."""
    from anomalib_cflow_plus import CflowPlus

    model = CflowPlus(backbone="efficientnet_lite0", coupling_blocks=1, training_recipe=recipe, fiber_batch_size=32)
    decoders = model.model.decoders
    updated: list[list[int]] = []

    def zero_grad(set_to_none: bool = True) -> None:
        del set_to_none
        for parameter in decoders.parameters():
            parameter.grad = None

    def step() -> None:
        updated.append([i for i, d in enumerate(decoders) if any(p.grad is not None for p in d.parameters())])

    model.optimizers = lambda: SimpleNamespace(zero_grad=zero_grad, step=step)
    model.lr_schedulers = lambda: SimpleNamespace(step=lambda: None)
    model.manual_backward = lambda loss: loss.backward()
    model.log = lambda *args, **kwargs: None
    # one process, 32-bit: no DDP wrapper, no gradient scaler
    model._trainer = SimpleNamespace(world_size=1, model=None, precision_plugin=SimpleNamespace())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # 2 x (8x8, 4x4, 2x2) fibers
    model.training_step(SimpleNamespace(image=images), 0)
    return updated


def test_the_paper_recipe_steps_layer_after_layer_and_fast_all_layers_at_once():
    # paper: each layer's 2 * h * w fibers in sub-batches of 32, one decoder per step: 128 / 32 + 1 + 1 steps
    assert _decoders_per_optimizer_step("paper") == [[0]] * 4 + [[1], [2]]
    # fast: every step trains the three decoders, each on a share of its positions: 128 / 32 steps
    assert _decoders_per_optimizer_step("fast") == [[0, 1, 2]] * 4


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


@pytest.mark.parametrize("joint_layers", [True, False])
def test_fiber_plan_is_reproducible_from_its_generator(joint_layers):
    def plan(seed):
        generator = torch.Generator().manual_seed(seed)
        return [
            torch.cat([index for _, index in step]) for step in fiber_plan([300, 80], 2, 64, joint_layers, generator)
        ]

    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = plan(7)
        torch.manual_seed(1)  # the global random state plays no part
        again = plan(7)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = plan(8)
    assert len(other) == len(first) and not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


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
