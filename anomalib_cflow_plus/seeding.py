"""Seeds of a CflowPlus run: the run's global seed, the CLI's ``--seed_everything``, and the fiber sub-batch seeds.

A run is seeded when Lightning's ``seed_everything`` has set ``PL_GLOBAL_SEED``. From Python, users call it
themselves. anomalib's CLI (2.7) declares ``--seed_everything`` (and the shipped configs set it), but never
calls ``seed_everything``; :func:`apply_cli_seed` does it for CflowPlus, from the config that the CLI hands
the trainer in its ``SaveConfigCallback``.
"""

from __future__ import annotations

import logging
import os

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.cli import SaveConfigCallback

logger = logging.getLogger(__name__)

SEED_VARIABLE = "PL_GLOBAL_SEED"  # set by Lightning's seed_everything
# The fiber sub-batches of (seed, epoch, batch, rank) are drawn from one integer key: the triple is packed with
# a prime radix larger than any epoch or batch index, then the rank is mixed in, and the key is folded into
# torch.Generator's seed range.
KEY_RADIX = 1_000_003
RANK_MULTIPLIER = 101
GENERATOR_SEED_RANGE = 2**63


def global_seed() -> int | None:
    """Return the seed that ``seed_everything`` set for this process, or ``None`` when the run is not seeded."""
    seed = os.environ.get(SEED_VARIABLE)
    return None if seed is None else int(seed)


def fiber_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """Return the generator seed of one batch's fiber sub-batches: a function of its place in training alone."""
    key = (seed * KEY_RADIX + epoch) * KEY_RADIX + batch
    return (key * RANK_MULTIPLIER + rank) % GENERATOR_SEED_RANGE


def cli_seed_setting(trainer: Trainer) -> int | bool | None:
    """Return the ``seed_everything`` value of the anomalib CLI config that ``trainer`` was built from, if any.

    ``None`` outside the CLI (no ``SaveConfigCallback``, or one without the key).
    """
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            value = getattr(callback.config, "seed_everything", None)
            if isinstance(value, bool | int):
                return value
    return None


def apply_cli_seed(trainer: Trainer) -> bool:
    """Seed the process from the CLI's ``--seed_everything``, as Lightning's own CLI does; return whether it did.

    An integer seeds with it; ``True`` (the CLI's default) picks a random seed, or ``PL_GLOBAL_SEED`` if set,
    and logs it, so that the run can be repeated; ``False`` or no CLI config leaves the process unseeded.
    """
    setting = cli_seed_setting(trainer)
    if setting is None or setting is False:
        return False
    seed_everything(None if setting is True else setting, workers=True)
    return True
