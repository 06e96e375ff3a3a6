"""How CflowPlus trains its decoders, free of Lightning: the recipes, the fiber sub-batch plan, the schedule, the step.

Training follows the paper's recipe: the frozen encoder's features are split, per layer, into random sub-batches
of ``fiber_batch_size`` fibers, and each sub-batch makes one Adam step on the ``-log sigmoid`` of its
per-dimension log-likelihood (:func:`~.flow.flow_loss`). :func:`fiber_plan` draws the sub-batches of one batch
of images, :func:`warmup_cosine_schedule` gives the learning rate of each step, and :class:`DecoderTraining` makes
the steps of one batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import nn
from torchvision.transforms.v2 import Resize

from .errors import ConfigurationError
from .flow import flow_loss

if TYPE_CHECKING:
    from .condition import GridCondition
    from .torch_model import CflowPlusModel

__all__ = [
    "DEFAULT_TRAIN_BATCH_SIZE",
    "TRAINING_RECIPES",
    "DecoderTraining",
    "RecipeDefaults",
    "Reduce",
    "TrainingRecipe",
    "check_fiber_batch_size",
    "check_training_options",
    "fiber_plan",
    "process_reduce",
    "resize_size",
    "resolve_recipe",
    "warmup_cosine_schedule",
]

logger = logging.getLogger(__name__)

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
    device: torch.device | None = None,
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
        device: Device of the indices when ``generator`` is ``None`` (a generator's own device otherwise).

    Returns:
        Steps; each is a list of ``(layer, indices (n,))``.

    """
    device = generator.device if generator is not None else device
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


Reduce = Callable[[torch.Tensor, str], torch.Tensor]
"""``reduce(tensor, op)`` across processes, ``op`` in ``"mean" | "max" | "sum"``, e.g. Lightning's strategy's."""


def process_reduce(trainer: Any) -> Reduce | None:
    """Return the trainer's cross-process reduction as a :data:`Reduce` onto its device, or ``None`` on one process.

    ``trainer`` is Lightning's (``world_size``, ``strategy.reduce`` and ``strategy.root_device``), read duck-typed.
    """
    if trainer is None or trainer.world_size == 1:
        return None
    strategy = trainer.strategy
    return lambda values, op: strategy.reduce(values.to(strategy.root_device), reduce_op=op)


class DecoderTraining:
    """The decoders' training step: the fiber plan, the step losses, the finite-step guard and gradient averaging.

    Free of Lightning: the optimizer and the backward pass come in as arguments, and so does ``reduce`` for
    several processes, whose gradients are averaged here (the caller keeps DDP's own reducer out through
    ``no_sync``: a step makes several backward passes, each over some decoders only).

    Args:
        model: The :class:`~.torch_model.CflowPlusModel` whose decoders train.
        fiber_batch_size: ``N``.
        joint_layers: The recipe's stepping, see :func:`fiber_plan`.
        max_skipped_steps: Consecutive non-finite steps skipped before :class:`FloatingPointError`.

    Attributes:
        skipped_steps: Optimizer steps skipped so far for a non-finite loss or gradient.

    """

    def __init__(
        self, model: CflowPlusModel, fiber_batch_size: int, joint_layers: bool, max_skipped_steps: int
    ) -> None:
        self.model = model
        self.fiber_batch_size = fiber_batch_size
        self.joint_layers = joint_layers
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def __call__(
        self,
        images: torch.Tensor,
        optimizer: Any,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        reduce: Reduce | None = None,
        generator: torch.Generator | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        scaled: bool = False,
        part_type: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Train on one batch of pre-processed images ``(B, 3, H, W)``: a few optimizer steps over its fibers.

        Args:
            images: The batch.
            optimizer: Has ``zero_grad(set_to_none=...)`` and ``step()`` (e.g. Lightning's wrapped optimizer).
            backward: Back-propagates a loss (e.g. ``LightningModule.manual_backward``, which scales it under
                ``16-mixed``).
            reduce: Cross-process reduction (:func:`process_reduce`), or ``None`` on one process.
            generator: Draws the fiber sub-batches; ``None`` uses the global random state.
            no_sync: Context in which the backward passes run (DDP's ``no_sync``).
            scaled: A gradient scaler steps the optimizer: it skips a non-finite step itself and lowers its scale,
                so every step is handed to it.
            part_type: Each image's part type ``(B,)``, which conditions the decoders of a model of several types.

        Returns:
            The mean loss per layer of the steps taken (NaN when every step was skipped).

        Raises:
            FloatingPointError: After ``max_skipped_steps`` non-finite steps in a row.

        """
        features = self.model.encode(images)
        if not self.model.normalization_initialized:
            self.initialize_normalization(features, reduce)
        typed = self.model.part_types.count
        part_type = self.model.feature_part_type(part_type, features[0]) if typed else None
        if typed and not all(bool(actnorm.type_initialized.all()) for actnorm in self.model.normalizations):
            self.initialize_type_normalization(features, part_type, reduce)
        fibers, conditions = zip(
            *(self.model.fibers(layer_features, part_type) for layer_features in features), strict=True
        )
        plan = fiber_plan(
            [condition.grid_size for condition in conditions],
            len(features[0]),  # images, or tiles of them
            self.fiber_batch_size,
            joint_layers=self.joint_layers,
            generator=generator,
            device=images.device,
        )
        if not self.joint_layers:
            fibers = [layer_fibers.flatten(end_dim=1) for layer_fibers in fibers]  # (B*h*w, C_l)
        losses = []
        for step in plan:
            loss = self.step_loss(step, fibers, conditions)
            optimizer.zero_grad(set_to_none=True)
            with no_sync():
                backward(loss)
            finite = self.gradients_are_finite(loss, reduce)
            if finite or scaled:
                optimizer.step()
            if finite:
                losses.append(loss.detach() / len(step))
                self.consecutive_skips = 0
            else:
                self.skip_step()
        return torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=images.device)

    def step_loss(
        self,
        step: Sequence[tuple[int, torch.Tensor]],
        fibers: Sequence[torch.Tensor],
        conditions: Sequence[GridCondition],
    ) -> torch.Tensor:
        """Sum over a step's layers of the flow loss of the fibers its indices pick.

        Joint steps pick positions of fibers ``(B, h*w, C_l)``, giving ``(B, n, C_l)``; paper steps pick flat fibers
        of ``(B*h*w, C_l)``, giving ``(n, C_l)``.
        """
        losses = []
        for layer, index in step:
            if self.joint_layers:
                picked, condition = fibers[layer][:, index], conditions[layer].select_positions(index)
            else:
                picked, condition = fibers[layer][index], conditions[layer].select(index)
            log_likelihoods = self.model.fiber_log_likelihood(layer, picked, condition)
            losses.append(flow_loss(log_likelihoods))
        return torch.stack(losses).sum()

    def initialize_normalization(self, features: Sequence[torch.Tensor], reduce: Reduce | None = None) -> None:
        """Data-initialize the decoders' ActNorms from a batch of features, averaged over processes.

        A batch with NaN or Inf features is passed over: it would poison the initialization; the next batch does it.
        """
        if not all(bool(torch.isfinite(layer_features).all()) for layer_features in features):
            return
        self.model.initialize_normalization(features)
        if reduce is not None:
            for actnorm in self.model.normalizations:
                for parameter in actnorm.parameters():
                    parameter.data.copy_(reduce(parameter.data.clone(), "mean"))

    @torch.no_grad()
    def initialize_type_normalization(
        self, features: Sequence[torch.Tensor], part_type: torch.Tensor, reduce: Reduce | None = None
    ) -> None:
        """Data-initialize each part type's normalization offsets from the first batch that has its images.

        Features ``(B, C_l, h_l, w_l)`` of images of types ``part_type (B,)``; the moments of each type's fibers are
        summed over processes, so that every process initializes the same types the same way.
        """
        if not all(bool(torch.isfinite(layer_features).all()) for layer_features in features):
            return
        for actnorm, layer_features in zip(self.model.normalizations, features, strict=True):
            fibers = layer_features.flatten(start_dim=2).double()  # (B, C, h*w)
            types = len(actnorm.type_initialized)
            count = torch.zeros(types, dtype=torch.float64, device=fibers.device)
            count.index_add_(0, part_type, torch.full_like(part_type, fibers.shape[-1], dtype=torch.float64))
            total = fibers.new_zeros(types, fibers.shape[1]).index_add_(0, part_type, fibers.sum(dim=-1))
            total_sq = fibers.new_zeros(types, fibers.shape[1]).index_add_(0, part_type, fibers.pow(2).sum(dim=-1))
            if reduce is not None:
                moments = reduce(torch.cat([count[:, None], total, total_sq], dim=1), "sum")
                count, total, total_sq = moments[:, 0], *moments[:, 1:].chunk(2, dim=1)
            actnorm.initialize_types(count, total, total_sq)

    def gradients_are_finite(self, loss: torch.Tensor, reduce: Reduce | None = None) -> bool:
        """Average the decoders' gradients over processes; whether they and the loss are finite on every process."""
        parameters = [parameter for parameter in self.model.decoders.parameters() if parameter.grad is not None]
        if reduce is None:  # one fused pass; a NaN or Inf makes it non-finite
            norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in parameters], error_if_nonfinite=False)
            return bool(torch.isfinite(loss.detach() + norm))
        flat = torch.cat([loss.detach().reshape(1).float(), *(p.grad.reshape(-1).float() for p in parameters)])
        flat = reduce(flat, "mean")  # a NaN or Inf on any process reaches all
        offset = 1
        for parameter in parameters:
            size = parameter.grad.numel()
            parameter.grad.copy_(flat[offset : offset + size].view_as(parameter.grad))
            offset += size
        return bool(torch.isfinite(flat).all())

    def skip_step(self) -> None:
        """Count a skipped step; stop training when too many follow one another.

        Raises:
            FloatingPointError: On the ``max_skipped_steps``-th skip in a row.

        """
        self.skipped_steps += 1
        self.consecutive_skips += 1
        logger.warning("Skipped an optimizer step with a non-finite loss or gradient (%d so far).", self.skipped_steps)
        if self.consecutive_skips >= self.max_skipped_steps:
            msg = (
                f"Training stopped: {self.consecutive_skips} optimizer steps in a row had a non-finite loss or "
                "gradient (NaN or Inf). Check the input images for NaN/Inf values and the pre-processing; "
                "a lower lr may help. The decoders keep their last finite weights."
            )
            raise FloatingPointError(msg)
