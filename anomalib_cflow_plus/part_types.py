"""Which part type an image shows, found from the image alone: one model for several part types.

A model trained on several part types (a :class:`~.data.MultiCategory` datamodule) keeps one prototype per type,
the mean global descriptor of its good training images, and gives every image the type of the nearest prototype.
The decoders are conditioned on that type (:class:`~.flow.ConditionalSubnet`), and the calibration is the type's
(:class:`~.anomaly_map.AnomalyMapGenerator`), so an exported model scores any trained type without being told which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["NOVELTY_MARGIN", "NOVELTY_WEIGHT", "PartTypeRecognizer", "image_descriptors"]

# An image is scored as novel only beyond its type's largest training distance plus this many stds of the training
# distances. On seven types (``python -m benchmarks.unified novelty``), good test images reached 6.3 stds beyond
# (metal_plate; the others 0.4), and every image of a type left out of training lay 10.7 or more beyond its nearest
# type: the margin sits in that gap.
NOVELTY_MARGIN = 8.0
# Each std of distance beyond the margin adds this many of the type's standardized score units (stds of its good
# training images' scores), so that a novel image scores above any threshold set on good images.
NOVELTY_WEIGHT = 10.0


def image_descriptors(features: Sequence[torch.Tensor], per_image: int = 1) -> torch.Tensor:
    """Global descriptors of images: L feature maps ``(B * per_image, C_l, h_l, w_l)`` -> unit vectors ``(B, sum C_l)``.

    Each layer's features are averaged over positions and scaled to unit length, so that every layer weighs the
    same; with tiles (``per_image`` maps per image), the tiles' descriptors are averaged. Per image: nothing crosses
    the batch.
    """
    pooled = torch.cat([F.normalize(layer.mean(dim=(-2, -1)), dim=1) for layer in features], dim=1)
    if per_image > 1:
        pooled = pooled.unflatten(0, (-1, per_image)).mean(dim=1)
    return F.normalize(pooled, dim=1)


class PartTypeRecognizer(nn.Module):
    """The part types a model was trained on, their names and prototypes, and the nearest-prototype rule.

    An image unlike every trained type must not pass as its nearest one: :meth:`novelty` is how far beyond its
    type's good training images an image's descriptor lies, ``relu(d - d_max - m * d_std) / d_std`` of the cosine
    distance ``d`` to the prototype, in the spread ``d_std`` of those images' distances, with the margin ``m`` of
    :data:`NOVELTY_MARGIN`, times :data:`NOVELTY_WEIGHT`; 0 within the margin. It is added to the image score.

    Args:
        descriptor_size (int): ``D``, the length of an image descriptor (the encoder's channels over its layers).

    Attributes:
        names: The part types' names, in index order (empty for a single-type model); saved in the state dict.
        prototypes: ``(T, D)`` buffer, each type's mean descriptor (unit length) over its good training images.
        distance_max: ``(T,)`` buffer, the largest distance of a type's training images to its prototype.
        distance_std: ``(T,)`` buffer, the std of those distances.

    """

    def __init__(self, descriptor_size: int) -> None:
        super().__init__()
        self.names: list[str] = []
        self.register_buffer("prototypes", torch.zeros(0, descriptor_size))
        self.register_buffer("distance_max", torch.zeros(0))
        self.register_buffer("distance_std", torch.ones(0))

    @property
    def count(self) -> int:
        """``T``, the number of part types; 0 for a model of a single type."""
        return len(self.names)

    def set_names(self, names: Sequence[str]) -> None:
        """Make the model one of the part types ``names`` (at least one, all different); the prototypes are reset."""
        names = [str(name) for name in names]
        if not names or len(set(names)) != len(names):
            msg = f"Part types must be one or more distinct names, got {names}."
            raise ValueError(msg)
        self.names = names
        self.prototypes = self.prototypes.new_zeros(len(names), self.prototypes.shape[1])
        self.distance_max = self.prototypes.new_zeros(len(names))
        self.distance_std = self.prototypes.new_ones(len(names))

    @torch.no_grad()
    def set_prototypes(self, descriptor_sums: torch.Tensor) -> None:
        """Set each type's prototype from the sum of its images' descriptors ``(T, D)``."""
        self.prototypes.copy_(F.normalize(descriptor_sums.to(self.prototypes), dim=1))

    @torch.no_grad()
    def set_distance_range(self, maximum: torch.Tensor, std: torch.Tensor) -> None:
        """Set each type's largest training distance and the distances' std, each ``(T,)``."""
        self.distance_max.copy_(maximum)
        self.distance_std.copy_(std.clamp_min(1e-6))

    def distance(self, descriptors: torch.Tensor, part_type: torch.Tensor) -> torch.Tensor:
        """Cosine distance of descriptors ``(B, D)`` to their type's prototype ``(B,)``."""
        return 1.0 - (descriptors * self.prototypes[part_type]).sum(dim=1)

    def novelty(self, descriptors: torch.Tensor, part_type: torch.Tensor) -> torch.Tensor:
        """Score how far beyond its type's training images each image lies: ``(B,)``, 0 within the margin."""
        spread = self.distance_std[part_type]
        excess = self.distance(descriptors, part_type) - self.distance_max[part_type] - NOVELTY_MARGIN * spread
        return NOVELTY_WEIGHT * F.relu(excess) / spread

    def similarity(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of descriptors ``(B, D)`` to every prototype -> ``(B, T)``."""
        return descriptors @ self.prototypes.T

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Give each image the part type of the nearest prototype: descriptors ``(B, D)`` -> indices ``(B,)``."""
        return self.similarity(descriptors).argmax(dim=1)

    def get_extra_state(self) -> dict[str, Any]:
        """Return the names, which travel in the state dict (checkpoints, ``load_state_dict``)."""
        return {"names": list(self.names)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the names."""
        self.names = list(state.get("names", []))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Take the saved number of types (none, from a checkpoint older than part types)."""
        state_dict.setdefault(prefix + "_extra_state", {"names": []})
        saved = state_dict.setdefault(prefix + "prototypes", self.prototypes.new_zeros(0, self.prototypes.shape[1]))
        self.prototypes = self.prototypes.new_empty(saved.shape)
        for name in ("distance_max", "distance_std"):
            setattr(
                self, name, self.prototypes.new_empty(state_dict.setdefault(prefix + name, saved.new_zeros(0)).shape)
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
