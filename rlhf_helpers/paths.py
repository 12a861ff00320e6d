"""Where things are: the project root, shipped data, and run folders.

Notebooks run with different working folders (JupyterLab starts them in `notebooks/`, the runner and
papermill in the project root), so relative paths are resolved against the project root found here.
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The folder holding `notebooks/` and `data/`: found upward from the working folder, else next to
    the installed package (an editable install), else the working folder. Override with
    `RLHF_PROJECT_ROOT`."""
    env = os.environ.get("RLHF_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir() and (folder / "rlhf_helpers").is_dir():
            return folder
    pkg_parent = Path(__file__).resolve().parent.parent
    if (pkg_parent / "notebooks").is_dir():
        return pkg_parent
    return here


def data_path(*parts: str) -> Path:
    """A path under the shipped `data/` folder."""
    return project_root().joinpath("data", *parts)


def resolve_run_dir(run_dir: str | os.PathLike) -> Path:
    """`run_dir` made absolute (relative paths count from the project root) and created."""
    path = Path(run_dir).expanduser()
    if not path.is_absolute():
        path = project_root() / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    """`run_dir/<stage>/`, created."""
    path = resolve_run_dir(run_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_sft_model(run_dir: str | os.PathLike, recorded: str) -> str:
    """The model a stage of `run_dir` built on, from the path it recorded (an adapter's base model, the reward
    model's backbone). A recorded path is absolute: where it names a run's SFT model (`.../sft/model`) and
    run_dir has one, run_dir's own is meant, so a run folder copied or moved elsewhere builds on its own SFT
    model, not on the one left at the old place (which may since have been trained again)."""
    local = resolve_run_dir(run_dir) / "sft" / "model"
    if Path(recorded).parts[-2:] == ("sft", "model") and (local / "config.json").exists():
        return str(local)
    return recorded
