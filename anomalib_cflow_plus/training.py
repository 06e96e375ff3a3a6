"""How CflowPlus trains its decoders, free of Lightning: the recipes, the fiber sub-batch plan and the schedule.

Training follows the paper's recipe: the frozen encoder's features are split, per layer, into random sub-batches
of ``fiber_batch_size`` fibers, and each sub-batch makes one Adam step on the ``-log sigmoid`` of its
per-dimension log-likelihood (:func:`~.flow.flow_loss`). :func:`fiber_plan` draws the sub-batches of one batch
of images; :func:`warmup_cosine_schedule` gives the learning rate of each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch

TrainingRecipe = Literal["fast", "paper"]


class RecipeDefaults(NamedTuple):
    """A training recipe: its default fiber sub-batch size ``N`` and Adam learning rate, and how it steps.

    ``joint_layers``: every optimizer step trains all decoders at once (``True``), or one layer's decoder on
    one sub-batch, layer after layer (``False``, the paper). See :func:`fiber_plan`.
    """

    fiber_batch_size: int
    lr: float
    joint_layers: bool


TRAINING_RECIPES: dict[str, RecipeDefaults] = {
    # The paper: N = 256, lr 2e-4, one Adam step per sub-batch, layer after layer.
    "paper": RecipeDefaults(fiber_batch_size=256, lr=2e-4, joint_layers=False),
    # All decoders per step, each on a share of its layer's positions in every image: N = 512 (2x the paper's),
    # about 2.6x fewer steps per batch than the paper recipe. N = 2048 made 4x fewer steps still and left real
    # objects under-trained at 3 epochs (screw image AUROC 0.70 against 0.79; benchmarks/README.md, study 5).
    "fast": RecipeDefaults(fiber_batch_size=512, lr=6e-4, joint_layers=True),
}


def warmup_cosine_schedule(
    total_steps: float, warmup_fraction: float, final_factor: float = 1e-3
) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine decay to ``final_factor``.

    With an unknown (infinite) number of steps, the factor stays at 1 after the warm-up.
    """
    if math.isinf(total_steps):
        return lambda step: 1.0
    total = max(int(total_steps), 1)
    warmup = math.ceil(total * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def fiber_plan(
    positions_per_layer: Sequence[int],
    images: int,
    fiber_batch_size: int,
    joint_layers: bool,
    generator: torch.Generator | None = None,
) -> list[list[tuple[int, torch.Tensor]]]:
    """Split each layer's fibers into random sub-batches and group them into optimizer steps.

    Args:
        positions_per_layer: ``h_l * w_l``, positions of each layer's feature map.
        images: ``B``, images in the batch; layer ``l`` has ``B * h_l * w_l`` fibers.
        fiber_batch_size: ``N``.
        joint_layers: ``False`` (the paper): one step per random sub-batch of ``N`` fibers, layer after
            layer; indices point into the flat ``(B*h*w)`` fibers. ``True``: every step trains all
            decoders, each on all images at a random share of its layer's positions; indices are
            positions, and the layer with the most fibers sets the steps, ``ceil(max B*h_l*w_l / N)``.
            Sharing positions across the images lets a step project each condition once, not B times.
        generator: Random generator of the permutations.

    Returns:
        Steps; each is a list of ``(layer, indices (n,))``.

    """
    device = generator.device if generator is not None else None
    if not joint_layers:
        orders = [torch.randperm(images * count, generator=generator, device=device) for count in positions_per_layer]
        return [[(layer, index)] for layer, order in enumerate(orders) for index in order.split(fiber_batch_size)]
    steps = max(math.ceil(images * max(positions_per_layer) / fiber_batch_size), 1)
    orders = [torch.randperm(count, generator=generator, device=device) for count in positions_per_layer]
    chunks = [order.tensor_split(min(steps, len(order))) for order in orders]
    return [
        [(layer, layer_chunks[step % len(layer_chunks)]) for layer, layer_chunks in enumerate(chunks)]
        for step in range(steps)
    ]
