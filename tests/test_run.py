"""The papermill runner: order, outputs beside (not over) the sources, failure report, run.json."""
import json
import subprocess
import sys

import nbformat
import pytest

from rlhf_helpers.run import discover_notebooks, run_suite

pytestmark = pytest.mark.slow


def _notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir: str = "runs/x"  # out\nprofile: str = "cpu"  # budget\nseed: int = 0  # seed')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def suite(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "00_first.ipynb",
              "import json, pathlib\nd = pathlib.Path(run_dir) / 'first'\nd.mkdir(parents=True, exist_ok=True)\n"
              "(d / 'summary.json').write_text(json.dumps({'profile': profile, 'seed': seed}))")
    _notebook(folder / "01_second.ipynb", "x = 1", "raise ValueError('boom in the second notebook')")
    _notebook(folder / "02_third.ipynb", "print('never reached')")
    return folder


def test_discover_in_order_and_only(suite):
    assert [p.stem for p in discover_notebooks(suite)] == ["00_first", "01_second", "02_third"]
    assert [p.stem for p in discover_notebooks(suite, ["02", "00"])] == ["00_first", "02_third"]
    with pytest.raises(ValueError, match="match no notebook"):
        discover_notebooks(suite, ["07"])


def test_run_stops_at_first_failure_and_reports_it(suite, tmp_path, capsys):
    sources_before = {p.name: p.read_bytes() for p in suite.iterdir()}
    run_dir = tmp_path / "run"
    record = run_suite("smoke", run_dir, seed=5, notebooks_dir=suite)
    out = capsys.readouterr().out
    assert record["status"] == "failed"
    assert [n["status"] for n in record["notebooks"]] == ["ok", "failed"]  # the third never ran
    assert "[1/3] 00_first ... ok in" in out
    assert "FAILED 01_second.ipynb, cell" in out and "boom in the second notebook" in out
    assert "raise ValueError" in out  # the failing cell's source is shown
    assert json.loads((run_dir / "first" / "summary.json").read_text()) == {"profile": "smoke", "seed": 5}
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["status"] == "failed" and saved["seed"] == 5 and saved["profile"]["name"] == "smoke"
    assert {"torch", "transformers", "trl", "peft", "python"} <= set(saved["versions"])
    assert (run_dir / "notebooks" / "00_first.ipynb").exists() and (run_dir / "notebooks" / "00_first.html").exists()
    assert (run_dir / "notebooks" / "01_second.html").exists()
    assert (run_dir / "index.html").exists()
    assert {p.name: p.read_bytes() for p in suite.iterdir()} == sources_before  # sources untouched


def test_cli_rejects_unknown_profile_and_only():
    bad = subprocess.run([sys.executable, "-m", "rlhf_helpers.run", "--profile", "laptop"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "rlhf_helpers.run", "--only", "99", "--run-dir", "/tmp/_unused_run"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "match no notebook" in bad.stderr
