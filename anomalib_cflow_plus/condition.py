"""2D sinusoidal positional encoding: the condition of every fiber."""

from __future__ import annotations

import math

import torch


def check_condition_dim(condition_dim: int) -> None:
    """Raise a ``ValueError`` unless ``condition_dim`` is a positive multiple of 4 (sin/cos for rows and columns)."""
    if condition_dim <= 0 or condition_dim % 4:
        msg = f"condition_vector must be a positive multiple of 4, got {condition_dim}."
        raise ValueError(msg)


def positional_encoding_2d(
    condition_dim: int,
    height: int,
    width: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Encode each position of an ``height x width`` grid as a ``condition_dim``-vector.

    The first half of the channels encodes the column, the second half the row. Within a
    half, channel ``2i`` is ``sin(pos * f_i)`` and ``2i + 1`` is ``cos(pos * f_i)`` with the
    geometric frequencies ``f_i = 10000 ** (-2i / (condition_dim / 2))`` of the Transformer.

    Args:
        condition_dim: ``P``, a positive multiple of 4.
        height: Rows ``h`` of the feature map.
        width: Columns ``w`` of the feature map.
        device: Device of the result.
        dtype: Floating dtype of the result.

    Returns:
        Tensor of shape ``(P, h, w)``.

    """
    check_condition_dim(condition_dim)
    half = condition_dim // 2
    frequencies = torch.exp(
        torch.arange(0, half, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / half),
    )
    columns = torch.arange(width, device=device, dtype=torch.float32)[None, :] * frequencies[:, None]  # (P/4, w)
    rows = torch.arange(height, device=device, dtype=torch.float32)[None, :] * frequencies[:, None]  # (P/4, h)
    encoding = torch.empty(condition_dim, height, width, device=device, dtype=torch.float32)
    encoding[0:half:2] = columns.sin()[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = columns.cos()[:, None, :].expand(-1, height, -1)
    encoding[half::2] = rows.sin()[:, :, None].expand(-1, -1, width)
    encoding[half + 1 :: 2] = rows.cos()[:, :, None].expand(-1, -1, width)
    return encoding.to(dtype)
