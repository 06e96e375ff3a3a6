"""The data package loads its parts on first use: the model never imports the demo generator."""

from pathlib import Path


def test_the_model_does_not_import_the_demo_generator():
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from anomalib_cflow_plus import CflowPlus; "
        "print('anomalib_cflow_plus.data' in sys.modules, 'anomalib_cflow_plus.data.demo' in sys.modules)"
    )
    repo = str(Path(__file__).resolve().parents[3])
    result = subprocess.run([sys.executable, "-c", code, repo], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True False"  # the data checks, without the generator
