"""2D sinusoidal positional encoding: the condition of every fiber."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .errors import ConfigurationError

__all__ = ["GridCondition", "check_condition_dim", "grid_condition", "positional_encoding_1d", "positional_encoding_2d"]


def check_condition_dim(condition_dim: int) -> None:
    """Check that ``condition_dim`` is a positive multiple of 4 (sin/cos for rows and columns).

    Raises:
        ConfigurationError: Otherwise.

    """
    if condition_dim <= 0 or condition_dim % 4:
        msg = f"condition_vector must be a positive multiple of 4, got {condition_dim}."
        raise ConfigurationError(msg)


def positional_encoding_1d(
    channels: int,
    length: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sinusoidal encoding of the positions ``0 .. length-1`` in ``channels`` (even) channels -> ``(length, channels)``.

    Channel ``2i`` is ``sin(pos * f_i)`` and ``2i + 1`` is ``cos(pos * f_i)``, with the geometric frequencies
    ``f_i = 10000 ** (-2i / channels)`` of the Transformer. Computed in float32, or in ``dtype`` where that is wider
    (float64), then cast to ``dtype``.
    """
    compute_dtype = torch.promote_types(dtype, torch.float32)
    frequencies = torch.exp(
        torch.arange(0, channels, 2, device=device, dtype=compute_dtype) * (-math.log(10000.0) / channels),
    )
    angles = torch.arange(length, device=device, dtype=compute_dtype)[:, None] * frequencies[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(start_dim=1).to(dtype)


class GridCondition(NamedTuple):
    """The positional condition of fibers on an ``h x w`` grid, kept separable, and optionally their part type.

    The 2D encoding of position ``(row, col)`` is ``[columns[col], rows[row]]`` (``P/2`` channels
    each), so a linear map of it splits into a row term and a column term. A decoder therefore
    projects ``h + w`` half-encodings instead of ``h * w`` full ones. A model trained on several part
    types also conditions on the type, a learned vector per type (:class:`~.flow.ConditionalSubnet`).

    Attributes:
        rows: ``(h, P/2)`` encoding of each row.
        columns: ``(w, P/2)`` encoding of each column.
        row_index: ``(N,)`` row of each of N fibers, or ``None`` for every grid position in row-major
            order (fibers laid out as ``(..., h, w, C)``).
        column_index: ``(N,)`` column of each fiber, or ``None`` as above.
        part_type: Part-type index ``(B,)`` of each image, shared by all its fibers (fibers ``(B, ..., C)``), or
            ``(N,)`` of each of N flat fibers ``(N, C)`` after :meth:`select`; ``None`` for a single-type model.

    """

    rows: torch.Tensor
    columns: torch.Tensor
    row_index: torch.Tensor | None = None
    column_index: torch.Tensor | None = None
    part_type: torch.Tensor | None = None

    @property
    def grid_size(self) -> int:
        """Positions ``h * w`` of the grid."""
        return self.rows.shape[0] * self.columns.shape[0]

    def select(self, fiber_index: torch.Tensor) -> GridCondition:
        """Return the condition of fibers picked by ``fiber_index (N,)`` from a flat ``(B*h*w, C)`` fiber batch."""
        selected = self.select_positions(fiber_index % self.grid_size)
        if self.part_type is None:
            return selected
        return selected._replace(part_type=self.part_type[fiber_index // self.grid_size])

    def select_positions(self, position_index: torch.Tensor) -> GridCondition:
        """Return the condition of the positions ``position_index (n,)`` of every image, fibers ``(B, n, C)``."""
        width = self.columns.shape[0]
        return self._replace(row_index=position_index // width, column_index=position_index % width)

    def dense(self) -> torch.Tensor:
        """Return the full encodings: ``(h*w, P)`` for the whole grid, or ``(N, P)`` for indexed fibers."""
        if self.row_index is None or self.column_index is None:
            height, width = self.rows.shape[0], self.columns.shape[0]
            columns = self.columns[None, :, :].expand(height, -1, -1)
            rows = self.rows[:, None, :].expand(-1, width, -1)
            return torch.cat([columns, rows], dim=-1).flatten(end_dim=1)
        return torch.cat([self.columns[self.column_index], self.rows[self.row_index]], dim=-1)


def grid_condition(
    condition_dim: int,
    height: int,
    width: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> GridCondition:
    """Build the separable positional condition of every position of an ``height x width`` grid."""
    check_condition_dim(condition_dim)
    half = condition_dim // 2
    return GridCondition(
        rows=positional_encoding_1d(half, height, device, dtype),
        columns=positional_encoding_1d(half, width, device, dtype),
    )


def positional_encoding_2d(
    condition_dim: int,
    height: int,
    width: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Encode each position of an ``height x width`` grid as a ``condition_dim``-vector.

    The first half of the channels encodes the column, the second half the row, each with
    :func:`positional_encoding_1d`.

    Returns:
        Tensor of shape ``(P, h, w)``.

    """
    condition = grid_condition(condition_dim, height, width, device, dtype)
    return condition.dense().T.reshape(condition_dim, height, width)
