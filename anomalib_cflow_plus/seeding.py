"""Seeds of a CflowPlus run: the run's global seed, the CLI's ``--seed_everything``, and the fiber sub-batch seeds.

A run is seeded when Lightning's ``seed_everything`` has set ``PL_GLOBAL_SEED``. From Python, users call it
themselves. anomalib's CLI (2.7) declares ``--seed_everything`` (and the shipped configs set it), but never
calls ``seed_everything``; :func:`apply_cli_seed` does it for CflowPlus, from the config that the CLI hands
the trainer in its ``SaveConfigCallback``.
"""

from __future__ import annotations

import logging
import os

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

__all__ = [
    "GENERATOR_SEED_RANGE",
    "KEY_RADIX",
    "RANK_MULTIPLIER",
    "SEED_VARIABLE",
    "CliSeed",
    "EpochSeedCallback",
    "apply_cli_seed",
    "cli_seed_setting",
    "fiber_generator",
    "fiber_seed",
    "global_seed",
]

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

    An integer seeds with it; ``True`` (the CLI's default) seeds with ``PL_GLOBAL_SEED`` if it is set, else with
    0 (Lightning's rule for ``seed_everything(None)``, which its own CLI applies to ``True`` too); either way the
    seed is logged. ``False`` or no CLI config leaves the process unseeded.
    """
    setting = cli_seed_setting(trainer)
    if setting is None or setting is False:
        return False
    seed_everything(None if setting is True else setting, workers=True)
    return True


class CliSeed:
    """Applies the CLI's seed (``--seed_everything``) once per process, from the model's first hook that can.

    anomalib's CLI builds the model before any seed could be set, so its decoders were drawn unseeded: a fit
    redraws them under the seed (a resumed fit too, before the checkpoint's weights replace them).
    """

    def __init__(self) -> None:
        self.applied = False

    def apply(self, trainer: Trainer | None) -> bool:
        """Seed from ``trainer``'s CLI once; whether the decoders should be redrawn (a seed was set, for a fit)."""
        if trainer is None or self.applied:
            return False
        self.applied = True
        return apply_cli_seed(trainer) and trainer.state.fn == TrainerFn.FITTING


def fiber_generator(epoch: int, batch: int, rank: int, device: torch.device) -> torch.Generator | None:
    """Return the generator of one batch's fiber sub-batches: seeded by (seed, epoch, batch, rank), or ``None``.

    Seeding by the place in training, not by the global random state, makes a resumed run draw the same sub-batches
    as an uninterrupted one; processes add their rank, so that they differ. ``None`` in an unseeded run.
    """
    seed = global_seed()
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(fiber_seed(seed, epoch, batch, rank))


class EpochSeedCallback(Callback):
    """Reseed the global random state per epoch of a seeded run: a resumed run then matches an uninterrupted one.

    The training dataloader's sampler draws its shuffling from the global random state when the
    epoch's first batch is fetched, after ``on_train_epoch_start``, where the state is set to
    ``seed + epoch``. Creating the epoch's iterator draws one more number (torch's base seed for
    the loader); Lightning creates it after this hook for later epochs, but before it for the
    first epoch of a fit, fresh or resumed, so that draw is repeated here then. The fiber
    sub-batches use their own generator (:func:`fiber_generator`). Inactive unless
    ``seed_everything`` set a seed. A checkpoint taken mid-epoch resumes with another order.
    """

    def __init__(self) -> None:
        self.first_epoch_of_fit = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Note that a fit, fresh or resumed, starts: its first epoch's iterator exists already."""
        del trainer, pl_module
        self.first_epoch_of_fit = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Seed the epoch, as if its dataloader iterator were created after this hook."""
        del pl_module
        seed = global_seed()
        if seed is None:
            return
        torch.manual_seed(seed + trainer.current_epoch)
        if self.first_epoch_of_fit:
            torch.empty((), dtype=torch.int64).random_()  # the draw the iterator's creation makes
        self.first_epoch_of_fit = False
