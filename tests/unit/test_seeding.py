"""Tests for the run's seeds: the CLI's --seed_everything and the fiber sub-batch seeds."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import SaveConfigCallback

from anomalib_cflow_plus.seeding import SEED_VARIABLE, apply_cli_seed, cli_seed_setting, fiber_seed, global_seed


def trainer_with_cli_config(**config) -> SimpleNamespace:
    return SimpleNamespace(callbacks=[object(), SaveConfigCallback(ArgumentParser(), Namespace(**config))])


@pytest.fixture(autouse=True)
def unseeded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SEED_VARIABLE, raising=False)


def test_an_integer_seed_from_the_cli_seeds_the_run() -> None:
    assert cli_seed_setting(trainer_with_cli_config(seed_everything=42)) == 42
    assert apply_cli_seed(trainer_with_cli_config(seed_everything=42))
    assert global_seed() == 42


def test_true_picks_a_seed_and_false_or_no_cli_leaves_the_run_unseeded() -> None:
    assert not apply_cli_seed(trainer_with_cli_config(seed_everything=False))
    assert not apply_cli_seed(SimpleNamespace(callbacks=[]))
    assert global_seed() is None
    assert apply_cli_seed(trainer_with_cli_config(seed_everything=True))
    assert global_seed() is not None and os.environ[SEED_VARIABLE].isdigit()


def test_fiber_seeds_depend_on_the_place_in_training_only() -> None:
    seeds = {fiber_seed(7, epoch, batch, rank) for epoch in range(3) for batch in range(50) for rank in range(2)}
    assert len(seeds) == 300  # every (epoch, batch, rank) its own seed
    assert all(0 <= seed < 2**63 for seed in seeds)  # torch.Generator's seed range
    assert fiber_seed(8, 1, 2) != fiber_seed(7, 1, 2)  # the run's seed counts
    assert fiber_seed(7, 2, 1) != fiber_seed(7, 1, 2)  # epoch and batch are not interchangeable
    assert 0 <= fiber_seed(2**62, 10**6, 10**6, 7) < 2**63  # large seeds and indices are folded into the range
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = fiber_seed(7, 1, 2)
        torch.manual_seed(1)
        assert fiber_seed(7, 1, 2) == first  # not drawn from the global random state
    assert fiber_seed(7, 1, 2, rank=0) == first  # rank 0 is the default
    # the seeds of the releases before the seeding module, so that seeded runs keep their sub-batches
    assert fiber_seed(7, 1, 2, 1) == 707_004_343_006_869
