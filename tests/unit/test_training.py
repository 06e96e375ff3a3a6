"""Training without Lightning: the recipes, the fiber sub-batch plan and the learning-rate schedule."""

import math
from types import SimpleNamespace

import pytest
import torch

from anomalib_cflow_plus.torch_model import CflowPlusModel
from anomalib_cflow_plus.training import TRAINING_RECIPES, DecoderTraining, fiber_plan, warmup_cosine_schedule


def _decoders_per_optimizer_step(recipe: str) -> list[list[int]]:
    """Train a small model on one batch; return, for each optimizer step, the decoders it updated."""
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1)
    decoders = model.decoders
    updated: list[list[int]] = []

    def zero_grad(set_to_none: bool = True) -> None:
        del set_to_none
        for parameter in decoders.parameters():
            parameter.grad = None

    def step() -> None:
        updated.append([i for i, d in enumerate(decoders) if any(p.grad is not None for p in d.parameters())])

    training = DecoderTraining(model, 32, TRAINING_RECIPES[recipe].joint_layers, max_skipped_steps=1)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # 2 x (8x8, 4x4, 2x2) fibers
    loss = training(images, SimpleNamespace(zero_grad=zero_grad, step=step))
    assert bool(torch.isfinite(loss)) and training.skipped_steps == 0
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


class _Optimizer:
    def __init__(self) -> None:
        self.steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        del set_to_none

    def step(self) -> None:
        self.steps += 1


def _nan_backward(loss: torch.Tensor) -> None:
    """A backward pass whose gradients overflow, as under 16-mixed with too large a loss scale."""
    loss.backward()
    for parameter in _nan_backward.parameters:
        if parameter.grad is not None:
            parameter.grad.fill_(float("inf"))


@pytest.mark.parametrize("scaled", [False, True])
def test_a_non_finite_step_is_skipped_and_a_gradient_scaler_still_gets_it(scaled: bool) -> None:
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1)
    _nan_backward.parameters = list(model.decoders.parameters())
    training = DecoderTraining(model, 64, joint_layers=True, max_skipped_steps=100)
    optimizer = _Optimizer()
    loss = training(torch.rand(1, 3, 64, 64), optimizer, backward=_nan_backward, scaled=scaled)
    steps = training.skipped_steps
    assert steps >= 1 and bool(torch.isnan(loss))  # every step skipped: no finite loss to report
    # A GradScaler skips a non-finite step itself and lowers its scale: it must be handed every step.
    assert optimizer.steps == (steps if scaled else 0)


def test_too_many_non_finite_steps_in_a_row_stop_training() -> None:
    model = CflowPlusModel(backbone="efficientnet_lite0", coupling_blocks=1)
    _nan_backward.parameters = list(model.decoders.parameters())
    training = DecoderTraining(model, 16, joint_layers=False, max_skipped_steps=2)
    with pytest.raises(FloatingPointError, match="2 optimizer steps in a row had a non-finite loss or gradient"):
        training(torch.rand(1, 3, 64, 64), _Optimizer(), backward=_nan_backward)
