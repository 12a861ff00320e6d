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
