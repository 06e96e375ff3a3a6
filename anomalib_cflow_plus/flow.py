"""Conditional normalizing-flow decoder over feature fibers.

A *fiber* is the feature vector of one spatial position of one encoder layer, shape ``(C,)``.
A decoder maps fibers ``x`` (N, C), given their positional *condition* ``c`` (N, P), to latents
``z`` (N, C) with a tractable ``log|det J|`` (N,). Under a standard-normal prior this gives the
per-dimension log-likelihood used both as training objective and as anomaly evidence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import InvertibleModule
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .condition import GridCondition

__all__ = [
    "ConditionalAffineCoupling",
    "ConditionalSubnet",
    "FiberActNorm",
    "build_decoder",
    "flow_loss",
    "grid_log_likelihood",
    "log_likelihood",
    "permute_channels",
    "set_decoder_part_types",
]

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def per_part_type(values: torch.Tensor, part_type: torch.Tensor, fibers: torch.Tensor) -> torch.Tensor:
    """Pick each fiber's row of per-type ``values (T, D)``, broadcastable against the fibers.

    ``part_type (B,)`` with fibers ``(B, ..., C)`` gives ``(B, 1, ..., D)``; ``(N,)`` with ``(N, C)`` gives ``(N, D)``.
    The leading size is ``-1``, so that an export keeps the batch dynamic.
    """
    return values[part_type].view(-1, *([1] * (fibers.dim() - 2)), values.shape[-1])


class _PermuteChannels(torch.autograd.Function):
    """``x[..., permutation]`` whose backward is the gather ``grad[..., inverse]``, not a scatter-add.

    Indexing's own backward accumulates into zeros (``index_put_``), several times slower on CPU
    than a gather; a permutation is a bijection, so its gradient is the inverse gather.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, permutation: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x[..., permutation]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad[..., inverse], None, None


def permute_channels(x: torch.Tensor, permutation: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Reorder the last dimension of ``x (..., C)`` by ``permutation (C,)``; ``inverse`` is its argsort."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteChannels.apply(x, permutation, inverse)
    return x[..., permutation]  # inference and export: a plain Gather


class ConditionalSubnet(nn.Module):
    """Coupling subnet of the paper, ``Linear(fiber ++ condition -> hidden) -> ReLU -> Linear(-> out)``.

    The first Linear is kept as two parts, ``fiber_in`` and ``condition_in`` (the same function as
    one Linear over the concatenation), so that a :class:`~.condition.GridCondition` is projected
    once per row and once per column instead of once per fiber. The last Linear starts at zero,
    so every coupling block starts as the identity map.

    A model trained on several part types adds a learned vector per type, ``type_in (T, hidden)``, to the first
    layer (the same as a one-hot type code concatenated to the condition): every coupling's scale and shift then
    depend on the part type, a class-conditional flow. It is empty, ``(0, hidden)``, for a single type
    (:meth:`set_part_types`).

    Args:
        fiber_features: Channels of the passive half of the fibers.
        condition_features: ``P``.
        out_features: Channels produced (log-scale and shift of the active half).
        hidden_ratio: The hidden width as a multiple of the paper's, ``2 * (fiber_features + condition_features)``.

    """

    def __init__(
        self, fiber_features: int, condition_features: int, out_features: int, hidden_ratio: float = 1.0
    ) -> None:
        super().__init__()
        hidden = max(1, round(hidden_ratio * 2 * (fiber_features + condition_features)))
        self.fiber_in = nn.Linear(fiber_features, hidden)
        self.condition_in = nn.Linear(condition_features, hidden, bias=False)
        self.out = nn.Linear(hidden, out_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.type_in = nn.Parameter(torch.zeros(0, hidden))

    def set_part_types(self, count: int) -> None:
        """Give the subnet a fresh vector per part type (``count``; 0: a single-type model, no type term).

        Drawn as ``condition_in``'s weights are (a one-hot input of ``count`` features through a Linear).
        """
        weight = torch.empty(count, self.type_in.shape[1], device=self.type_in.device, dtype=self.type_in.dtype)
        bound = 1.0 / math.sqrt(max(count, 1))
        self.type_in = nn.Parameter(nn.init.uniform_(weight, -bound, bound))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Take the saved number of part types (none, from a checkpoint of a single-type model)."""
        saved = state_dict.setdefault(prefix + "type_in", self.type_in.new_zeros(0, self.type_in.shape[1]))
        if saved.shape != self.type_in.shape:
            self.type_in = nn.Parameter(self.type_in.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def type_term(self, condition: torch.Tensor | GridCondition, fibers: torch.Tensor) -> torch.Tensor | None:
        """Return the part types' first-layer term, broadcastable to the fibers' hidden ``(..., hidden)``, or ``None``.

        ``part_type (B,)`` with fibers ``(B, ..., C)`` gives ``(B, 1, ..., hidden)``; ``(N,)`` with ``(N, C)`` gives
        ``(N, hidden)``.
        """
        if not isinstance(condition, GridCondition) or condition.part_type is None or not len(self.type_in):
            return None
        return per_part_type(self.type_in, condition.part_type, fibers)

    def condition_projection(self, condition: torch.Tensor | GridCondition) -> torch.Tensor:
        """``condition_in`` of a dense condition ``(..., P)`` or of the picked positions of a grid ``(N, hidden)``."""
        if isinstance(condition, GridCondition):
            # Picked positions: project their encodings. Gathering projected rows instead would put a
            # scatter-add with CPU atomics, whose order varies between runs, into the backward pass.
            return self.condition_in(condition.dense())
        return self.condition_in(condition)

    def grid_hidden(self, fibers: torch.Tensor, condition: GridCondition) -> torch.Tensor:
        """First layer for a whole grid: fibers ``(..., h, w, C_in)`` -> ``(..., h, w, hidden)``.

        The condition is projected once per row and once per column. The columns' term goes in through a ``(..., h,
        w * hidden)`` view of the projected fibers, in which it is one vector; the rows' term ``(h, 1, hidden)``,
        which carries the bias, is then broadcast-added. Two broadcast adds in a row would be reassociated by
        OpenVINO's conversion into one add of a folded ``(h, w, hidden)`` constant per coupling, which the IR
        then stores: +28% for a 256-px lite1, and 16 times more at 1024 px.
        """
        half = condition.columns.shape[-1]
        weight = self.condition_in.weight
        rows = condition.rows @ weight[:, half:].T + self.fiber_in.bias  # (h, hidden)
        types = self.type_term(condition, fibers)  # (B, 1, 1, hidden) or None
        if types is not None:
            rows = rows + types[:, 0]  # (B, h, hidden): still one add into the hidden layer
        columns = condition.columns @ weight[:, :half].T  # (w, hidden)
        hidden = F.linear(fibers, self.fiber_in.weight)  # (..., h, w, hidden)
        # The rows' add comes last, next to the ReLU (and in INT8 to the quantizer of the next product): they fuse.
        return (hidden.flatten(start_dim=-2) + columns.flatten()).unflatten(-1, columns.shape) + rows[..., None, :]

    def forward(self, fibers: torch.Tensor, condition: torch.Tensor | GridCondition) -> torch.Tensor:
        """Fibers ``(..., C_in)`` with their condition -> ``(..., out_features)``.

        The condition is dense and broadcastable, an indexed grid (one position per fiber), or a whole grid with
        fibers laid out as ``(..., h, w, C_in)``.
        """
        if isinstance(condition, GridCondition) and condition.row_index is None:
            hidden = self.grid_hidden(fibers, condition)
        else:
            hidden = self.fiber_in(fibers) + self.condition_projection(condition)
            types = self.type_term(condition, fibers)
            if types is not None:
                hidden = hidden + types
        return self.out(F.relu(hidden))


class ConditionalAffineCoupling(InvertibleModule):
    """Affine coupling block with a soft-clamped scale, conditioned on ``c``, then an index permutation.

    The first ``C // 2`` channels (``passive``) and the condition parameterize a scale and shift
    for the remaining channels (``active``):
    ``active' = active * exp(s) + t`` with ``s = alpha * tanh(raw / alpha)`` (soft clamp to ``(-alpha, alpha)``).
    The output channels are then reordered by a fixed random permutation stored as an index
    buffer of ``C`` integers; a dense ``C x C`` permutation matrix is never built.

    Fibers may carry leading dimensions: ``(N, C)`` with a dense condition ``(N, P)`` or an indexed
    :class:`~.condition.GridCondition`, or ``(B, h, w, C)`` with a whole-grid ``GridCondition``.

    Args:
        dims_in: ``[(C,)]``, the fiber shape.
        dims_c: ``[(P,)]``, the condition shape.
        clamp_alpha: Soft-clamp bound of the log-scale.
        subnet_constructor: Builds the subnet ``(fiber_features, condition_features, out_features) -> nn.Module``.
        permutation_seed: Seed of this block's channel permutation.

    """

    def __init__(
        self,
        dims_in: Sequence[tuple[int, ...]],
        dims_c: Sequence[tuple[int, ...]],
        clamp_alpha: float = 1.9,
        subnet_constructor: Callable[[int, int, int], nn.Module] = ConditionalSubnet,
        permutation_seed: int = 0,
    ) -> None:
        super().__init__(dims_in, dims_c)
        channels = dims_in[0][0]
        if len(dims_in[0]) != 1 or channels < 2:
            msg = f"ConditionalAffineCoupling needs 1D fibers with at least 2 channels, got {dims_in[0]}."
            raise ValueError(msg)
        condition_dim = dims_c[0][0]
        self.passive_channels = channels // 2
        active_channels = channels - self.passive_channels
        self.clamp_alpha = clamp_alpha
        self.subnet = subnet_constructor(self.passive_channels, condition_dim, 2 * active_channels)
        generator = torch.Generator().manual_seed(permutation_seed)
        permutation = torch.randperm(channels, generator=generator)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor | GridCondition] = (),
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        """Map fibers ``x[0]`` (..., C) given the condition ``c[0]``; return ``((y,), log_det (...))``."""
        del jac  # the log-det is a by-product of the scale and always returned
        fibers = x[0]
        if rev:
            fibers = fibers[..., self.inverse_permutation]
        passive, active = fibers[..., : self.passive_channels], fibers[..., self.passive_channels :]
        # Under autocast the subnet's products are reduced-precision; the affine map and its log-det are not.
        raw_scale, shift = self.subnet(passive, c[0]).to(fibers.dtype).chunk(2, dim=-1)
        log_scale = self.clamp_alpha * torch.tanh(raw_scale / self.clamp_alpha)
        if rev:
            active = (active - shift) * torch.exp(-log_scale)
            return (torch.cat([passive, active], dim=-1),), -log_scale.sum(dim=-1)
        active = active * torch.exp(log_scale) + shift
        output = torch.cat([passive, active], dim=-1)
        return (permute_channels(output, self.permutation, self.inverse_permutation),), log_scale.sum(dim=-1)

    def score_grid(
        self, fibers: torch.Tensor, condition: GridCondition, permute: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference form of :meth:`forward` for a whole grid: fibers ``(B, h, w, C)`` -> ``(y, log_det (B, h, w))``.

        The same function, in fewer and cheaper ops: the permutation is one ``index_select`` (a single ``Gather``
        along the channels in an exported graph, where ``x[..., permutation]`` exports as a transpose, a
        ``GatherND`` and a transpose back), and ``permute=False`` leaves it out, which a likelihood allows: it does
        not depend on the order of ``z``'s channels.
        """
        passive, active = fibers[..., : self.passive_channels], fibers[..., self.passive_channels :]
        raw_scale, shift = self.subnet(passive, condition).chunk(2, dim=-1)
        log_scale = self.clamp_alpha * torch.tanh(raw_scale / self.clamp_alpha)
        output = torch.cat([passive, active * torch.exp(log_scale) + shift], dim=-1)
        if permute:
            output = torch.index_select(output, -1, self.permutation)
        return output, log_scale.sum(dim=-1)

    def output_dims(self, input_dims: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Fibers keep their shape."""
        return list(input_dims)


class FiberActNorm(InvertibleModule):
    """Per-channel affine normalization of fibers (Glow's ActNorm) with an explicit data initialization.

    ``y = x * exp(scale) + bias`` with ``log|det J| = sum(scale)``. FrEIA's ``ActNorm`` is not used:
    it initializes itself on whatever batch it sees first (so an untrained model's scores would
    depend on their batch), it divides by zero on constant channels, and its closure hook makes
    the model unpicklable (anomalib's torch export pickles it). Here the initialization only
    happens through :meth:`initialize`, is bounded for constant channels, and its flag is a buffer.
    """

    def __init__(self, dims_in: Sequence[tuple[int, ...]], dims_c: Sequence[tuple[int, ...]] | None = None) -> None:
        super().__init__(dims_in, dims_c)
        channels = dims_in[0][0]
        self.scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # A model of several part types: each type's own offsets (T, C), so that every type's fibers are normalized
        # by its own statistics, as a single-type model's are; empty for a single type.
        self.type_scale = nn.Parameter(torch.zeros(0, channels))
        self.type_bias = nn.Parameter(torch.zeros(0, channels))
        self.register_buffer("type_initialized", torch.zeros(0, dtype=torch.bool))

    def set_part_types(self, count: int) -> None:
        """Give the normalization zero offsets for ``count`` part types (0: none), each to be data-initialized."""
        channels = self.scale.shape[0]
        self.type_scale = nn.Parameter(self.scale.new_zeros(count, channels))
        self.type_bias = nn.Parameter(self.scale.new_zeros(count, channels))
        self.type_initialized = torch.zeros(count, dtype=torch.bool, device=self.scale.device)

    @torch.no_grad()
    def initialize_types(self, count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor) -> None:
        """Set the offsets of every part type not yet initialized that has fibers, from their moments.

        ``count (T,)``, ``total (T, C)`` and ``total_sq (T, C)``: the number, sum and sum of squares of each type's
        fibers (over every process). The type's fibers then leave the normalization zero-mean and unit-variance.
        """
        due = (count > 1) & ~self.type_initialized
        if not bool(due.any()):
            return
        mean = total[due] / count[due, None]
        std = (total_sq[due] / count[due, None] - mean.pow(2)).clamp_min(1e-6).sqrt().clamp_min(1e-3)
        self.type_scale[due] = (-torch.log(std) - self.scale).to(self.type_scale)
        self.type_bias[due] = (-mean / std - self.bias).to(self.type_bias)
        self.type_initialized |= due

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Take the saved number of part types (none, from a checkpoint of a single-type model)."""
        channels = self.scale.shape[0]
        for name in ("type_scale", "type_bias"):
            saved = state_dict.setdefault(prefix + name, self.scale.new_zeros(0, channels))
            if saved.shape != getattr(self, name).shape:
                setattr(self, name, nn.Parameter(self.scale.new_empty(saved.shape)))
        saved = state_dict.setdefault(prefix + "type_initialized", torch.zeros(0, dtype=torch.bool))
        self.type_initialized = torch.zeros(saved.shape, dtype=torch.bool, device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_bias(self, condition: Any, fibers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each fiber's scale and bias: the shared ``(C,)``, plus its type's offsets when the condition has types.

        With ``part_type (B,)`` and fibers ``(B, ..., C)`` they are ``(B, 1, ..., C)``; with ``(N,)`` and ``(N, C)``,
        ``(N, C)``.
        """
        part_type = getattr(condition, "part_type", None)
        if part_type is None or not len(self.type_scale):
            return self.scale, self.bias
        scale, bias = (per_part_type(values, part_type, fibers) for values in (self.type_scale, self.type_bias))
        return self.scale + scale, self.bias + bias

    @torch.no_grad()
    def initialize(self, fibers: torch.Tensor, eps: float = 1e-3) -> None:
        """Set scale and bias so that ``fibers`` (..., C) become zero-mean and unit-variance per channel."""
        fibers = fibers.reshape(-1, fibers.shape[-1])
        std = fibers.std(dim=0).clamp_min(eps)
        self.scale.copy_(-torch.log(std))
        self.bias.copy_(-fibers.mean(dim=0) / std)
        self.initialized.fill_(True)

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] = (),
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        """Normalize fibers ``x[0]`` (..., C); return ``((y,), log_det (...))``.

        The condition ``c[0]`` matters only through its part types (:meth:`scale_and_bias`).
        """
        del jac
        fibers = x[0]
        scale, bias = self.scale_and_bias(c[0] if c else None, fibers)
        log_det = scale.sum(dim=-1).expand(fibers.shape[:-1])
        if rev:
            return ((fibers - bias) * torch.exp(-scale),), -log_det
        return (fibers * torch.exp(scale) + bias,), log_det

    def output_dims(self, input_dims: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Fibers keep their shape."""
        return list(input_dims)


def build_decoder(
    channels: int,
    condition_dim: int,
    coupling_blocks: int = 8,
    clamp_alpha: float = 1.9,
    seed: int = 0,
    hidden_ratio: float = 1.0,
) -> SequenceINN:
    """Build one layer's decoder: an ActNorm followed by ``coupling_blocks`` conditional couplings.

    Args:
        channels: Fiber dimension ``C`` of the layer.
        condition_dim: Condition dimension ``P``.
        coupling_blocks: Number of coupling blocks ``K``.
        clamp_alpha: Soft-clamp bound of each coupling's log-scale.
        seed: Seed from which the blocks' permutations are drawn.
        hidden_ratio: Hidden width of the coupling subnets, as a multiple of the paper's (:class:`ConditionalSubnet`).

    Returns:
        A FrEIA ``SequenceINN``: ``decoder(x (..., C), c=[condition]) -> (z (..., C), log_det (...))``,
        with a dense condition ``(..., P)`` or a :class:`~.condition.GridCondition`.

    """
    decoder = SequenceINN(channels)
    decoder.append(FiberActNorm, cond=0, cond_shape=(condition_dim,))
    for block in range(coupling_blocks):
        decoder.append(
            ConditionalAffineCoupling,
            cond=0,
            cond_shape=(condition_dim,),
            clamp_alpha=clamp_alpha,
            subnet_constructor=functools.partial(ConditionalSubnet, hidden_ratio=hidden_ratio),
            permutation_seed=seed * 1009 + block,
        )
    return decoder


def set_decoder_part_types(decoder: SequenceINN, count: int) -> None:
    """Give every coupling of ``decoder`` a fresh vector per part type (``count``; 0: none), see ConditionalSubnet."""
    for block in decoder:
        if isinstance(block, ConditionalAffineCoupling) and isinstance(block.subnet, ConditionalSubnet):
            block.subnet.set_part_types(count)
        elif isinstance(block, FiberActNorm):
            block.set_part_types(count)


def grid_log_likelihood(decoder: SequenceINN, fibers: torch.Tensor, condition: GridCondition) -> torch.Tensor:
    """Per-dimension log-likelihood of a whole grid of fibers, the inference form of ``decoder``.

    Equal to ``log_likelihood(*decoder(fibers, c=[condition]))`` (to float rounding), without the last
    coupling's permutation and with each other one a single gather (:meth:`ConditionalAffineCoupling.score_grid`).

    Args:
        decoder: A decoder from :func:`build_decoder`.
        fibers: ``(B, h, w, C)``, e.g. NHWC features permuted to channels-last order (a view, not a copy).
        condition: The grid's condition, :func:`~.condition.grid_condition` of ``h x w``.

    Returns:
        Log-likelihoods ``(B, h, w)``.

    """
    normalization, *couplings = decoder
    (state,), log_det = normalization((fibers,), c=[condition])
    for index, coupling in enumerate(couplings):
        state, block_log_det = coupling.score_grid(state, condition, permute=index < len(couplings) - 1)
        log_det = log_det + block_log_det
    return log_likelihood(state, log_det)


def log_likelihood(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-dimension log-likelihood of fibers under a standard-normal latent.

    Args:
        z: Latents, shape ``(..., C)``.
        log_jac_det: ``log|det dz/dx|``, shape ``(...)``.

    Returns:
        ``(log N(z; 0, I) + log|det J|) / C``, shape ``(...)``.

    """
    channels = z.shape[-1]
    return (-0.5 * z.pow(2).sum(dim=-1) + log_jac_det) / channels - _HALF_LOG_TWO_PI


def flow_loss(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """Training loss: mean of ``-log sigmoid(log_likelihood)`` over fibers (N,) -> scalar."""
    return -F.logsigmoid(log_likelihoods).mean()
