"""Side-by-side timing shared by the benchmarks: every runner once per round, in a rotating order."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any


def round_robin_ms(
    runners: dict[Hashable, Callable[[], Any]],
    repeats: int,
    warmup: int = 3,
) -> dict[Hashable, list[float]]:
    """Wall time in ms of each runner in each of ``repeats`` rounds, after ``warmup`` untimed rounds.

    The order rotates by one per round, so that no runner always goes first and machine noise hits
    every runner alike; take medians (or medians of per-round ratios) of the returned samples.
    """
    names = list(runners)
    samples: dict[Hashable, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name]()
            elapsed = (time.perf_counter() - start) * 1e3
            if round_index >= warmup:
                samples[name].append(elapsed)
    return samples
