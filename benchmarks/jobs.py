"""Fresh-process jobs and a process's memory, with the standard library only.

A job runs in a fresh process so that its peak memory and threads are its own. This module imports nothing
heavy, so that a job process loads only what its job measures (an OpenVINO deployment process stays lean).

- :func:`run_job` (the benchmark's side): ``python -m MODULE JOB SPEC.json RESULT.json`` from the repository root;
- :func:`serve` (the job process's side): run ``jobs[JOB](spec)`` and write its result;
- :func:`peak_rss_mb`: the peak resident set size of this process since it started; :func:`reset_peak_rss` and
  :func:`peak_rss_since_reset_mb` measure it over a window (Linux).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "benchmarks" / "out"

Job = Callable[[dict[str, Any]], dict[str, Any]]


def run_job(
    module: str,
    job: str,
    spec: dict[str, Any],
    job_dir: Path,
    name: str,
    *,
    reuse: bool = False,
    threads: int | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Run ``python -m MODULE JOB SPEC.json RESULT.json`` in a fresh process, from the repository root.

    The spec, result and log are ``job_dir/NAME.spec.json``, ``NAME.json`` and ``NAME.log``. With ``reuse``, the
    result of an earlier run of the same spec is returned without running it again. ``threads`` sets
    ``OMP_NUM_THREADS`` in the job. A failed job returns ``{"error": ..., "log": ..., "log_tail": [...]}``.
    """
    label = label or name
    job_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (job_dir / f"{name}.{suffix}" for suffix in ("spec.json", "json", "log"))
    spec_text = json.dumps(spec, indent=2, default=str)
    if reuse and result_path.is_file() and spec_path.is_file() and spec_path.read_text() == spec_text:
        print(f"  {label}: reused {result_path}", flush=True)
        return json.loads(result_path.read_text())
    spec_path.write_text(spec_text)
    result_path.unlink(missing_ok=True)
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    command = [sys.executable, "-m", module, job, str(spec_path), str(result_path)]
    start = time.perf_counter()
    with log_path.open("w") as log:
        returncode = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, check=False
        ).returncode
    seconds = time.perf_counter() - start
    if returncode != 0 or not result_path.is_file():
        tail = log_path.read_text().splitlines()[-5:]
        print(
            f"  {label}: FAILED (exit {returncode}) after {seconds:.0f} s, log {log_path}",
            *tail,
            sep="\n    ",
            flush=True,
        )
        return {"error": f"exit {returncode}", "log": str(log_path), "log_tail": tail}
    print(f"  {label}: done in {seconds:.0f} s", flush=True)
    return json.loads(result_path.read_text())


def serve(jobs: dict[str, Job], argv: Sequence[str] | None = None) -> None:
    """The job process's side of :func:`run_job`: ``JOB SPEC.json RESULT.json`` runs ``jobs[JOB](spec)``."""
    job, spec_path, result_path = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    result = jobs[job](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ memory


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (``ru_maxrss``), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_kb(field_name: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((float(line.split()[1]) for line in lines if line.startswith(f"{field_name}:")), None)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``), in MiB; :func:`peak_rss_mb` where unknown."""
    peak_kb = _proc_status_kb("VmHWM")
    return peak_kb / 1024 if peak_kb is not None else peak_rss_mb()


def current_rss_mb() -> float:
    """Current resident set size in MiB (NaN where unknown)."""
    rss_kb = _proc_status_kb("VmRSS")
    return rss_kb / 1024 if rss_kb is not None else float("nan")
