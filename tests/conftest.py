"""Shared test set-up: everything runs offline, as on a machine with no network."""
import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: spinning ones slow a busy 2-core machine


@pytest.fixture
def load_script():
    """Import a file of the repository that is not in the package (`scripts/x.py`, `benchmarks/y.py`) as a module."""
    root = Path(__file__).resolve().parent.parent

    def load(relpath: str):
        spec = importlib.util.spec_from_file_location(Path(relpath).stem, root / relpath)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def two_processes():
    """Run `args` (a script and its arguments, or `-m module ...`) on two CPU processes under torchrun, as
    `accelerate launch` starts a stage on several (gloo, one thread each); returns the finished process."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", *args],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    return run
