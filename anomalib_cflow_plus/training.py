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
from torch import nn
from torchvision.transforms.v2 import Resize

from .errors import ConfigurationError

TrainingRecipe = Literal["fast", "paper"]
DEFAULT_TRAIN_BATCH_SIZE = 32  # anomalib's datamodules' default


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


def resolve_recipe(recipe: str, fiber_batch_size: int | None, lr: float | None) -> tuple[int, float]:
    """Return ``(fiber_batch_size, lr)``: the values given, or the recipe's defaults; raise on invalid ones."""
    if recipe not in TRAINING_RECIPES:
        msg = f"training_recipe must be one of {sorted(TRAINING_RECIPES)}, got {recipe!r}."
        raise ConfigurationError(msg)
    defaults = TRAINING_RECIPES[recipe]
    fiber_batch_size = defaults.fiber_batch_size if fiber_batch_size is None else fiber_batch_size
    lr = defaults.lr if lr is None else lr
    if fiber_batch_size < 1:
        msg = f"fiber_batch_size must be >= 1, got {fiber_batch_size}."
        raise ConfigurationError(msg)
    if lr <= 0:
        msg = f"lr must be > 0, got {lr}."
        raise ConfigurationError(msg)
    return fiber_batch_size, lr


def check_training_options(warmup_fraction: float, max_skipped_steps: int) -> None:
    """Raise :class:`~.errors.ConfigurationError` on a warm-up share outside [0, 1) or ``max_skipped_steps < 1``."""
    if max_skipped_steps < 1:
        msg = f"max_skipped_steps must be >= 1, got {max_skipped_steps}."
        raise ConfigurationError(msg)
    if not 0.0 <= warmup_fraction < 1.0:
        msg = f"warmup_fraction must lie in [0, 1), got {warmup_fraction}."
        raise ConfigurationError(msg)


def check_fiber_batch_size(
    fiber_batch_size: int, image_size: tuple[int, int] | None, encoder: nn.Module, first_layer: str
) -> None:
    """Reject a fiber batch larger than the fibers of a whole batch of images at the model's input size.

    Args:
        fiber_batch_size: ``N``.
        image_size: ``(H, W)`` of the model's input (see :func:`resize_size`); ``None``: not known, not checked.
        encoder: The timm ``features_only`` encoder; its smallest stride gives the most fibers per image.
        first_layer: Name of that layer, for the message.

    The batch is anomalib's default training batch of 32 images. A larger ``N`` would make every batch a single
    sub-batch, silently changing the recipe.

    """
    if image_size is None:
        return
    stride = min(encoder.feature_info.reduction())
    per_image = math.ceil(image_size[0] / stride) * math.ceil(image_size[1] / stride)
    available = per_image * DEFAULT_TRAIN_BATCH_SIZE
    if fiber_batch_size > available:
        msg = (
            f"fiber_batch_size={fiber_batch_size} is larger than the {available} fibers of a batch of "
            f"{DEFAULT_TRAIN_BATCH_SIZE} images at {image_size[0]}x{image_size[1]} "
            f"({per_image} per image at layer {first_layer}). "
            f"Choose a fiber_batch_size of at most {available}."
        )
        raise ConfigurationError(msg)


def resize_size(pre_processor: object) -> tuple[int, int] | None:
    """``(H, W)`` that a pre-processor's first ``Resize`` gives every image, or ``None`` when it is not fixed.

    ``Resize((H, W))`` gives ``(H, W)``. ``Resize(S)`` (or ``Resize([S])``) scales the *shorter* edge to ``S``
    and keeps the aspect ratio, so the size depends on the image: ``None``.
    """
    transform = getattr(pre_processor, "transform", None)
    transforms = getattr(transform, "transforms", [transform])
    for step in transforms:
        if isinstance(step, Resize):
            size = step.size
            if isinstance(size, Sequence) and len(size) == 2:
                return int(size[0]), int(size[1])
            return None
    return None
