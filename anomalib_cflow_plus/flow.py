"""Conditional normalizing-flow decoder over feature fibers.

A *fiber* is the feature vector of one spatial position of one encoder layer, shape ``(C,)``.
A decoder maps fibers ``x`` (N, C), given their positional *condition* ``c`` (N, P), to latents
``z`` (N, C) with a tractable ``log|det J|`` (N,). Under a standard-normal prior this gives the
per-dimension log-likelihood used both as training objective and as anomaly evidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import InvertibleModule
from torch import nn
from torch.nn import functional as F  # noqa: N812

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def subnet_fc(in_features: int, out_features: int) -> nn.Sequential:
    """Coupling subnet of the paper: Linear(in -> 2*in) -> ReLU -> Linear(2*in -> out).

    The last layer starts at zero, so every coupling block starts as the identity map.
    """
    hidden = 2 * in_features
    subnet = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
    nn.init.zeros_(subnet[-1].weight)
    nn.init.zeros_(subnet[-1].bias)
    return subnet


class ConditionalAffineCoupling(InvertibleModule):
    """Affine coupling block with a soft-clamped scale, conditioned on ``c``, then an index permutation.

    The first ``C // 2`` channels (``passive``) and the condition parameterize a scale and shift
    for the remaining channels (``active``):
    ``active' = active * exp(s) + t`` with ``s = alpha * tanh(raw / alpha)`` (soft clamp to ``(-alpha, alpha)``).
    The output channels are then reordered by a fixed random permutation stored as an index
    buffer of ``C`` integers; a dense ``C x C`` permutation matrix is never built.

    Args:
        dims_in: ``[(C,)]``, the fiber shape.
        dims_c: ``[(P,)]``, the condition shape.
        clamp_alpha: Soft-clamp bound of the log-scale.
        subnet_constructor: Builds the subnet ``(in_features, out_features) -> nn.Module``.
        permutation_seed: Seed of this block's channel permutation.

    """

    def __init__(
        self,
        dims_in: Sequence[tuple[int, ...]],
        dims_c: Sequence[tuple[int, ...]],
        clamp_alpha: float = 1.9,
        subnet_constructor: Callable[[int, int], nn.Module] = subnet_fc,
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
        self.subnet = subnet_constructor(self.passive_channels + condition_dim, 2 * active_channels)
        generator = torch.Generator().manual_seed(permutation_seed)
        permutation = torch.randperm(channels, generator=generator)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] = (),
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        """Map fibers ``x[0]`` (N, C) given the condition ``c[0]`` (N, P); return ``((y,), log_det (N,))``."""
        del jac  # the log-det is a by-product of the scale and always returned
        fibers = x[0]
        if rev:
            fibers = fibers[:, self.inverse_permutation]
        passive, active = fibers[:, : self.passive_channels], fibers[:, self.passive_channels :]
        raw_scale, shift = self.subnet(torch.cat([passive, c[0]], dim=1)).chunk(2, dim=1)
        log_scale = self.clamp_alpha * torch.tanh(raw_scale / self.clamp_alpha)
        if rev:
            active = (active - shift) * torch.exp(-log_scale)
            return (torch.cat([passive, active], dim=1),), -log_scale.sum(dim=1)
        active = active * torch.exp(log_scale) + shift
        return (torch.cat([passive, active], dim=1)[:, self.permutation],), log_scale.sum(dim=1)

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

    @torch.no_grad()
    def initialize(self, fibers: torch.Tensor, eps: float = 1e-3) -> None:
        """Set scale and bias so that ``fibers`` (N, C) become zero-mean and unit-variance per channel."""
        std = fibers.std(dim=0).clamp_min(eps)
        self.scale.copy_(-torch.log(std))
        self.bias.copy_(-fibers.mean(dim=0) / std)
        self.initialized.fill_(True)

    def forward(
        self,
        x: Sequence[torch.Tensor],
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        """Normalize fibers ``x[0]`` (N, C); return ``((y,), log_det (N,))``."""
        del jac
        fibers = x[0]
        log_det = self.scale.sum().expand(fibers.shape[0])
        if rev:
            return ((fibers - self.bias) * torch.exp(-self.scale),), -log_det
        return (fibers * torch.exp(self.scale) + self.bias,), log_det

    def output_dims(self, input_dims: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Fibers keep their shape."""
        return list(input_dims)


def build_decoder(
    channels: int,
    condition_dim: int,
    coupling_blocks: int = 8,
    clamp_alpha: float = 1.9,
    seed: int = 0,
) -> SequenceINN:
    """Build one layer's decoder: an ActNorm followed by ``coupling_blocks`` conditional couplings.

    Args:
        channels: Fiber dimension ``C`` of the layer.
        condition_dim: Condition dimension ``P``.
        coupling_blocks: Number of coupling blocks ``K``.
        clamp_alpha: Soft-clamp bound of each coupling's log-scale.
        seed: Seed from which the blocks' permutations are drawn.

    Returns:
        A FrEIA ``SequenceINN``: ``decoder(x (N, C), c=[cond (N, P)]) -> (z (N, C), log_det (N,))``.

    """
    decoder = SequenceINN(channels)
    decoder.append(FiberActNorm)
    for block in range(coupling_blocks):
        decoder.append(
            ConditionalAffineCoupling,
            cond=0,
            cond_shape=(condition_dim,),
            clamp_alpha=clamp_alpha,
            permutation_seed=seed * 1009 + block,
        )
    return decoder


def log_likelihood(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-dimension log-likelihood of fibers under a standard-normal latent.

    Args:
        z: Latents, shape ``(N, C)``.
        log_jac_det: ``log|det dz/dx|``, shape ``(N,)``.

    Returns:
        ``(log N(z; 0, I) + log|det J|) / C``, shape ``(N,)``.

    """
    channels = z.shape[1]
    return (-0.5 * z.pow(2).sum(dim=1) + log_jac_det) / channels - _HALF_LOG_TWO_PI


def flow_loss(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """Training loss: mean of ``-log sigmoid(log_likelihood)`` over fibers (N,) -> scalar."""
    return -F.logsigmoid(log_likelihoods).mean()
