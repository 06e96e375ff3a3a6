"""Helpers to run anomalib's CLI of this interpreter's environment in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
_METRIC_ROW = re.compile(r"(\w+)\s*[│|]\s*([-+0-9.eE]+)\s*[│|]")


def run(
    *args: str,
    timeout: int = 900,
    stdout_only: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a command, fail the test with its output if it fails, and return stdout (+ stderr).

    ``env`` adds variables to this process's environment.
    """
    returncode, output, stdout = run_unchecked(*args, timeout=timeout, env=env, cwd=cwd)
    assert returncode == 0, f"{' '.join(args)} exited with {returncode}:\n{output[-6000:]}"
    return stdout if stdout_only else output


def run_unchecked(
    *args: str, timeout: int = 900, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    """Run a command; return its exit status, its stdout + stderr, and its stdout."""
    environment = {**os.environ, **env} if env else None
    process = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, env=environment, cwd=cwd
    )
    return process.returncode, process.stdout + process.stderr, process.stdout


def metrics(output: str) -> dict[str, float]:
    """The test metrics of the table anomalib prints after testing."""
    return {name: float(value) for name, value in _METRIC_ROW.findall(output)}
