"""Run the notebooks in order with papermill: `python -m rlhf_helpers.run --profile cpu --run-dir runs/NAME`.

Each notebook in `notebooks/` (named `NN_title.ipynb`) is executed into `run_dir/notebooks/`, never over
its source, with the parameters it declares among `run_dir`, `profile`, `seed` and `model_name` (plus any
`--param KEY=VALUE` it declares). One progress line per notebook with its time; the first failure stops
the run and prints the failing cell and its error. At the end (success or not) `run_dir/run.json` records
versions, profile, seed and timings, each executed notebook is exported to HTML beside it, and
`run_dir/index.html` links them with every stage's `summary.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .config import PROFILES, get_profile
from .paths import project_root, resolve_run_dir
from .tracking import atomic_write_json, atomic_write_text

STANDARD_PARAMETERS = ("run_dir", "profile", "seed", "model_name")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookFailed(RuntimeError):
    """A notebook raised; carries the failing cell's index, source and error for a readable report."""

    def __init__(self, notebook: Path, cell_index: int, source: str, error: str, output: Path):
        self.notebook, self.cell_index, self.source, self.error, self.output = notebook, cell_index, source, error, output
        super().__init__(f"{notebook.name}: cell {cell_index} failed: {error.splitlines()[-1] if error else ''}")

    def report(self) -> str:
        cell = "\n".join(f"    {line}" for line in self.source.splitlines())
        return (f"FAILED {self.notebook.name}, cell {self.cell_index}:\n{cell}\n\n{self.error}\n"
                f"The executed notebook, with the error in place, is at {self.output}")


def discover_notebooks(folder: Path | None = None, only: Sequence[str] | None = None) -> list[Path]:
    """Notebooks `NN_*.ipynb` in order; `only` keeps those whose number (or name) is listed."""
    folder = folder or project_root() / "notebooks"
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if only is None:
        return found
    wanted = {w.strip() for w in only if w.strip()}
    if not wanted:  # `--only ""` or `--only ,`: an empty shell variable, most likely, not "every notebook"
        raise ValueError(f"--only names no notebook ({','.join(only)!r}); give numbers such as 02,03, or leave "
                         f"--only out to run them all")
    chosen = [p for p in found if p.name[:2] in wanted or p.stem in wanted]
    known = {p.name[:2] for p in found} | {p.stem for p in found}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"--only names {unknown}, which match no notebook; present: {[p.stem for p in found]}")
    return chosen


def notebook_parameters(path: Path) -> dict[str, dict]:
    """The parameters a notebook declares in its `parameters` cell (name -> papermill's description)."""
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node

    nb = load_notebook_node(str(path))
    # papermill needs a kernel to pick its parameter parser; a notebook saved without one is Python here
    return {p.name: p._asdict() for p in _infer_parameters(nb, name="python3", language="python")}


PARAMETER_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
EXAMPLES = {"bool": "true or false", "int": "a whole number, e.g. 5", "float": "a number, e.g. 0.5",
            "str": "text, e.g. rm"}


def check_parameters(notebooks: Sequence[Path], extra: dict[str, Any]) -> None:
    """Refuse, before anything runs, a `--param` that none of `notebooks` declares (a typo would otherwise
    change nothing, silently) or whose value is not of the type its notebook declares (the text "False"
    would otherwise turn a switch on)."""
    flags = {"run_dir": "--run-dir", "profile": "--profile", "seed": "--seed", "model_name": "--model-name"}
    for key in extra:
        if key in flags:  # the run record would say one thing and the notebooks do another
            raise ValueError(f"--param {key}: set it with {flags[key]}, which the run record and every notebook read")
    declared: dict[str, tuple[str, dict]] = {}
    for nb in notebooks:
        for name, spec in notebook_parameters(nb).items():
            declared.setdefault(name, (nb.stem, spec))
    for key, value in extra.items():
        if key not in declared:
            raise ValueError(f"--param {key}: none of the notebooks to run ({', '.join(nb.stem for nb in notebooks)}) "
                             f"declares it; they declare: {', '.join(sorted(declared))}")
        where, spec = declared[key]
        kind = spec.get("inferred_type_name")
        types = PARAMETER_TYPES.get(kind)
        if types and value is not None and (isinstance(value, bool) and kind != "bool" or not isinstance(value, types)):
            raise ValueError(f"--param {key}={value!r}: {where} declares {key} a {kind} (default {spec['default']}), "
                             f"not a {type(value).__name__}; give {EXAMPLES[kind]} (values are read as JSON)")


def execute_notebook(path: Path, out_dir: Path, parameters: dict[str, Any], cwd: Path | None = None,
                     timeout_s: int | None = None) -> Path:
    """Execute `path` into `out_dir/<name>`, passing the `parameters` it declares; raise NotebookFailed."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    declared = notebook_parameters(path)
    passed = {k: v for k, v in parameters.items() if k in declared and v is not None}
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / path.name
    env_path = os.environ.get("PATH", "")
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env_path.split(os.pathsep):  # the kernel and any tool it calls use this environment
        os.environ["PATH"] = bin_dir + os.pathsep + env_path
    # figures as plotly JSON (JupyterLab) and as HTML with plotly.js embedded (the offline HTML export)
    os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype+notebook")
    # idle OpenMP threads sleep instead of spinning: on a 2-core machine with anything else running,
    # spinning threads made generation 5-10x slower (measured); it must be set before torch starts
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        with tempfile.TemporaryDirectory(prefix="rlhf-kernel-") as sockets:
            papermill.execute_notebook(
                str(path), str(output), parameters=passed, kernel_name="python3", language="python",
                progress_bar=False, cwd=str(cwd or project_root()), execution_timeout=timeout_s,
                kernel_manager_class=_local_kernel_manager(sockets),
            )
    except PapermillExecutionError as e:
        error = ANSI.sub("", "\n".join(e.traceback[-12:])) if e.traceback else f"{e.ename}: {e.evalue}"
        raise NotebookFailed(path, e.cell_index, e.source, error, output) from None
    return output


def _local_kernel_manager(sockets: str):
    """A kernel manager that talks to its kernel over local (IPC) sockets in the private folder `sockets`
    rather than over TCP ports: nothing here leaves the machine, and ipykernel warns at every start that TCP
    without keys is open to eavesdropping. (Left to itself, jupyter would put IPC sockets in the working
    directory, the repository, where two kernels started together could take the same names.) ZeroMQ has no
    IPC sockets on Windows: there, jupyter's default (TCP on localhost) stays."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import Unicode, default

    if os.name != "posix":
        return AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        transport = Unicode("ipc")

        @default("ip")
        def _ip_default(self):
            return os.path.join(sockets, "kernel")

    return LocalKernelManager


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def export_html(notebook: Path) -> Path:
    """An HTML copy of an executed notebook, next to it, that reads offline. Widgets cannot: the export would
    fetch their embed manager from a CDN. So their saved state is left out, and an output that carries a
    static copy beside its widget (notebook 01's reward tuner) shows the copy."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data and "text/html" in data:
                del data[WIDGET_VIEW]
    body, _ = HTMLExporter().from_notebook_node(nb)
    return atomic_write_text(notebook.with_suffix(".html"), body)


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("rlhf_helpers", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
                "bitsandbytes", "papermill", "plotly", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                                text=True, timeout=10)
        out["git_commit"] = commit.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def write_index(run_dir: Path, record: dict) -> Path:
    """`run_dir/index.html`: the status of every notebook, links to their HTML, and every summary.json."""
    rows = []
    for nb in record["notebooks"]:
        link = f'<a href="notebooks/{html.escape(nb["name"])}.html">{html.escape(nb["name"])}</a>'
        rows.append(f"<tr><td>{link}</td><td>{nb['status']}</td><td>{nb['seconds']:.1f} s</td></tr>")
    summaries = []
    for path in sorted(run_dir.glob("*/summary.json")):
        text = html.escape(path.read_text(encoding="utf-8"))
        summaries.append(f"<h3>{html.escape(path.parent.name)}/summary.json</h3><pre>{text}</pre>")
    report = run_dir / "eval" / "report.html"
    extra = '<p><a href="eval/report.html">Evaluation report</a></p>' if report.exists() else ""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>RLHF run</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em 1em}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>"
        f"<h1>RLHF run: {html.escape(run_dir.name)}</h1>"
        f"<p>profile <b>{html.escape(record['profile']['name'])}</b>, seed {record['seed']}, "
        f"status <b>{record['status']}</b>, {record['total_seconds']:.0f} s in all.</p>{extra}"
        "<table><tr><th>notebook</th><th>status</th><th>time</th></tr>" + "".join(rows) + "</table>"
        + "".join(summaries) + "</body></html>"
    )
    return atomic_write_text(run_dir / "index.html", page)


def run_suite(profile: str, run_dir: str | os.PathLike, seed: int = 0, only: Sequence[str] | None = None,
              model_name: str | None = None, extra: dict[str, Any] | None = None, html_export: bool = True,
              notebooks_dir: Path | None = None, stream=None) -> dict:
    """Execute the notebooks in order; return (and write to `run_dir/run.json`) what happened."""
    stream = stream or sys.stdout
    prof = get_profile(profile)
    notebooks = discover_notebooks(notebooks_dir, only)
    if not notebooks:
        raise FileNotFoundError(f"no notebooks named NN_*.ipynb in {notebooks_dir or project_root() / 'notebooks'}")
    check_parameters(notebooks, extra or {})
    run_path = resolve_run_dir(run_dir)  # created only once the run's settings are known to be good
    params = {"run_dir": str(run_path), "profile": prof.name, "seed": seed, "model_name": model_name, **(extra or {})}
    record: dict[str, Any] = {
        "profile": dataclasses.asdict(prof), "seed": seed, "model_name": model_name or prof.model_name,
        "parameters": params, "started": datetime.now(timezone.utc).isoformat(), "versions": versions(),
        "notebooks": [], "status": "running", "total_seconds": 0.0,
    }
    print(f"Running {len(notebooks)} notebook(s) with profile '{prof.name}' into {run_path}", file=stream, flush=True)
    t_start = time.perf_counter()
    failure: NotebookFailed | None = None
    for i, nb in enumerate(notebooks, start=1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(notebooks)}] {nb.stem} ...", end=" ", file=stream, flush=True)
        entry = {"name": nb.stem, "status": "ok", "seconds": 0.0}
        try:
            out = execute_notebook(nb, run_path / "notebooks", params)
        except NotebookFailed as e:
            failure, out = e, e.output
            entry["status"] = "failed"
            entry["error"] = {"cell_index": e.cell_index, "error": e.error.splitlines()[-1] if e.error else ""}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        if html_export and out.exists():
            export_html(out)
        record["notebooks"].append(entry)
        print(f"{entry['status']} in {entry['seconds']:.1f} s", file=stream, flush=True)
        if failure:
            print(failure.report(), file=stream, flush=True)
            break
    record["status"] = "failed" if failure else "ok"
    record["total_seconds"] = round(time.perf_counter() - t_start, 2)
    record["finished"] = datetime.now(timezone.utc).isoformat()
    atomic_write_json(run_path / "run.json", record)
    index = write_index(run_path, record)
    record["index"] = str(index)
    return record


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param wants KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    python = {"True": True, "False": False, "None": None}  # Python's spellings, as the notebooks write them
    if value in python:
        return key, python[value]
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.run", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="budget profile (default: cpu)")
    parser.add_argument("--run-dir", default=None, help="output folder (default: runs/<profile>)")
    parser.add_argument("--seed", type=int, default=0, help="global seed passed to every notebook")
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 02,03")
    parser.add_argument("--model-name", default=None, help="model for every notebook that takes one")
    parser.add_argument("--param", action="append", type=_parse_param, default=[],
                        help="KEY=VALUE passed to the notebooks that declare KEY (value read as JSON if it "
                             "parses; True, False and None too); a KEY no notebook to run declares is refused")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML export")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or f"runs/{args.profile}"
    only = args.only.split(",") if args.only is not None else None
    try:
        record = run_suite(args.profile, run_dir, seed=args.seed, only=only, model_name=args.model_name,
                           extra=dict(args.param), html_export=not args.no_html)
    except (ValueError, OSError) as e:  # bad settings, or a run folder that cannot be made
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Run record: {Path(record['index']).parent / 'run.json'}")
    report = Path(record["index"]).parent / "eval" / "report.html"
    print(f"Index: {record['index']}")
    print(f"Report: {report if report.exists() else record['index']}")
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
