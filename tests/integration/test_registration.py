"""The plugin is registered with anomalib after ``pip install``, with no import in user code."""

import re
import subprocess
import sys
from pathlib import Path

from .cli import ANOMALIB, run

REPO = Path(__file__).resolve().parents[2]


def python(code: str) -> str:
    return run(sys.executable, "-c", code, stdout_only=True)


def test_startup_hook_is_lazy():
    loaded = python("import sys; print(sorted(m for m in sys.modules if m.startswith(('anomalib', 'torch', 'timm'))))")
    assert loaded.strip().splitlines()[-1] == "['anomalib_cflow_plus_hook']"


def test_startup_hook_costs_under_five_ms():
    costs = []
    for _ in range(5):
        report = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
        match = re.search(r"import time:\s+\d+ \|\s+(\d+) \|\s+anomalib_cflow_plus_hook$", report.stderr, re.M)
        assert match, "the start-up hook is not installed (anomalib_cflow_plus_hook.pth)"
        costs.append(int(match.group(1)))
    assert min(costs) <= 5000, f"hook import costs {costs} us"


def test_get_model_by_name_and_class_path():
    output = python(
        "from anomalib.models import get_model\n"
        "by_name = get_model('CflowPlus', coupling_blocks=2)\n"
        "by_path = get_model({'class_path': 'CflowPlus', 'init_args': {'coupling_blocks': 3}})\n"
        "print(type(by_name).__module__, len(by_name.model.decoders[0]), len(by_path.model.decoders[0]))",
    )
    assert output.strip().splitlines()[-1] == "anomalib_cflow_plus.lightning_model 3 4"


def test_plugin_imported_before_anomalib_models():
    output = python(
        "import anomalib_cflow_plus, anomalib.models as m; print(m.CflowPlus is anomalib_cflow_plus.CflowPlus)"
    )
    assert output.strip().splitlines()[-1] == "True"


def test_cli_short_name_shows_hyper_parameters():
    output = run(ANOMALIB, "train", "--model.help", "CflowPlus")
    for argument in ("backbone", "fiber_batch_size", "coupling_blocks", "condition_vector", "clamp_alpha", "lr"):
        assert f"--model.{argument}" in output


def test_configs_parse_with_anomalib_cli():
    output = run(ANOMALIB, "train", "--config", str(REPO / "configs" / "demo.yaml"), "--print_config")
    assert "class_path: anomalib_cflow_plus.CflowPlus" in output
    assert "backbone: efficientnet_lite1" in output
    output = run(ANOMALIB, "train", "--model", "anomalib_cflow_plus.CflowPlus", "--data", "MVTecAD", "--print_config")
    assert "class_path: anomalib_cflow_plus.CflowPlus" in output
