"""Peak memory of a benchmark process; imports nothing heavy, so that a deployment-like process stays lean."""

from __future__ import annotations

import resource


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process (``ru_maxrss``), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
