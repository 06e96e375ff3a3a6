"""Helpers to run anomalib's CLI of this interpreter's environment in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
_METRIC_ROW = re.compile(r"(\w+)\s*[│|]\s*([-+0-9.eE]+)\s*[│|]")


def run(*args: str, timeout: int = 900, stdout_only: bool = False, env: dict[str, str] | None = None) -> str:
    """Run a command, fail the test with its output if it fails, and return stdout (+ stderr).

    ``env`` adds variables to this process's environment.
    """
    environment = {**os.environ, **env} if env else None
    process = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False, env=environment)
    output = process.stdout + process.stderr
    assert process.returncode == 0, f"{' '.join(args)} exited with {process.returncode}:\n{output[-6000:]}"
    return process.stdout if stdout_only else output


def metrics(output: str) -> dict[str, float]:
    """The test metrics of the table anomalib prints after testing."""
    return {name: float(value) for name, value in _METRIC_ROW.findall(output)}
