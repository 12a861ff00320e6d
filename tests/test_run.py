"""The papermill runner: order, outputs beside (not over) the sources, failure report, run.json."""
import json
import subprocess
import sys

import nbformat
import pytest

from rlhf_helpers.run import _parse_param, discover_notebooks, run_suite

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
    for empty in ([""], ["", ""]):  # `--only ""` or `--only ,`: an empty shell variable, not "run them all"
        with pytest.raises(ValueError, match="--only names no notebook"):
            discover_notebooks(suite, empty)


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


def test_a_param_no_notebook_declares_or_of_the_wrong_type_is_refused_before_anything_runs(suite, tmp_path):
    nb = nbformat.read(str(suite / "02_third.ipynb"), as_version=4)
    nb.cells[0].source += "\nuse_lora: bool = True  # LoRA or full fine-tuning\nmax_steps: int = 0  # 0: the profile's"
    nbformat.write(nb, str(suite / "02_third.ipynb"))
    run_dir = tmp_path / "run"
    for extra, message in (({"max_stpes": 5}, "--param max_stpes: none of the notebooks to run"),
                           ({"use_lora": "no"}, "02_third declares use_lora a bool"),
                           ({"max_steps": 2.5}, "declares max_steps a int"),
                           ({"max_steps": True}, "declares max_steps a int")):
        with pytest.raises(ValueError, match=message):
            run_suite("smoke", run_dir, notebooks_dir=suite, extra=extra)
        with pytest.raises(ValueError, match="none of the notebooks to run"):  # declared only by one not run
            run_suite("smoke", run_dir, notebooks_dir=suite, only=["00"], extra={"use_lora": False})
    for key, flag in (("profile", "--profile"), ("run_dir", "--run-dir"), ("seed", "--seed")):
        with pytest.raises(ValueError, match=f"--param {key}: set it with {flag}"):  # run.json would disagree
            run_suite("smoke", run_dir, notebooks_dir=suite, extra={key: "gpu"})
    assert not run_dir.exists()  # refused before the run folder was made
    assert _parse_param("use_lora=False") == ("use_lora", False)  # Python's spelling, as in the notebooks
    assert _parse_param("use_lora=false") == ("use_lora", False) and _parse_param("reward=gold") == ("reward", "gold")


def test_cli_reports_a_run_dir_that_is_a_file_as_an_error(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    bad = subprocess.run([sys.executable, "-m", "rlhf_helpers.run", "--only", "00", "--run-dir", str(taken)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_a_passing_suite_is_ok_through_main_and_a_failing_one_exits_1(suite, tmp_path, monkeypatch, capsys):
    """`make run` exits with main's status: 0 when every notebook ran, 1 when one failed; run.json says which."""
    from datetime import datetime

    from rlhf_helpers import run

    root = tmp_path / "project"  # main takes its notebooks from project_root()/notebooks
    (root / "notebooks").mkdir(parents=True)
    _notebook(root / "notebooks" / "00_first.ipynb",
              "import json, pathlib\nd = pathlib.Path(run_dir) / 'first'\nd.mkdir(parents=True, exist_ok=True)\n"
              "(d / 'summary.json').write_text(json.dumps({'seed': seed}))")
    _notebook(root / "notebooks" / "01_second.ipynb", "y = 2 + 2")
    monkeypatch.setattr(run, "project_root", lambda: root)
    good = tmp_path / "good"
    assert run.main(["--profile", "smoke", "--seed", "3", "--run-dir", str(good), "--no-html"]) == 0
    out = capsys.readouterr().out
    assert "[2/2] 01_second ... ok in" in out and f"Run record: {good / 'run.json'}" in out
    saved = json.loads((good / "run.json").read_text())
    assert saved["status"] == "ok" and [n["status"] for n in saved["notebooks"]] == ["ok", "ok"]
    assert [n["name"] for n in saved["notebooks"]] == ["00_first", "01_second"]
    assert datetime.fromisoformat(saved["finished"]) >= datetime.fromisoformat(saved["started"])
    assert json.loads((good / "first" / "summary.json").read_text()) == {"seed": 3}
    assert "status <b>ok</b>" in (good / "index.html").read_text()
    assert not list((good / "notebooks").glob("*.html"))  # --no-html
    monkeypatch.setattr(run, "project_root", lambda: suite.parent)  # the failing fixture, its failing notebook only
    bad = tmp_path / "bad"
    assert run.main(["--profile", "smoke", "--only", "01", "--run-dir", str(bad), "--no-html"]) == 1
    saved = json.loads((bad / "run.json").read_text())
    assert saved["status"] == "failed" and [n["status"] for n in saved["notebooks"]] == ["failed"]
    assert "finished" in saved and "FAILED 01_second.ipynb" in capsys.readouterr().out


def test_every_parameter_of_every_shipped_notebook_is_one_papermill_can_read():
    """papermill skips, with a log line only, a parameter line it cannot parse (an "=" or ":" in its comment
    does it): `--param` would then refuse that parameter as undeclared, and its help would be lost."""
    import re

    import papermill as pm

    from rlhf_helpers.paths import project_root

    notebooks = discover_notebooks(project_root() / "notebooks")
    assert len(notebooks) == 7
    for nb in notebooks:
        cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        declared = [m.group(1) for m in re.finditer(r"^(\w+)\s*:[^=]*=", cell.source, re.M)]
        assert declared and [p["name"] for p in pm.inspect_notebook(str(nb)).values()] == declared, nb.name


def test_the_html_export_reads_offline_and_shows_the_tuner_as_saved(tmp_path, monkeypatch):
    """A widget in the HTML export needs an embed manager from a CDN; the export shows the static copy that
    notebook 01's tuner carries beside its widget instead, and leaves the saved widget state out."""
    from rlhf_helpers import reward_tuner as RT
    from rlhf_helpers import rewards as R
    from rlhf_helpers.run import WIDGET_VIEW, export_html

    tuner = RT.RewardTuner(RT.load_candidates(), R.default_mix({"politeness": 0.0}), tmp_path / "cfg.json")
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda bundle, raw: shown.append(bundle))
    tuner._ipython_display_()
    bundle = shown[0]
    assert WIDGET_VIEW in bundle and "politeness 0.00" in bundle["text/html"]
    assert "Spearman rank agreement with the gold judge" in bundle["text/html"]
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    nb.cells = [nbformat.v4.new_code_cell("tuner", outputs=[nbformat.v4.new_output("display_data", data=bundle)])]
    path = tmp_path / "01.ipynb"
    nbformat.write(nb, str(path))
    page = export_html(path).read_text()
    assert "unpkg.com" not in page and "widget-state" not in page
    assert "The reward tuner as it was saved (all prompts; weights" in page
