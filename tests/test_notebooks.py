"""Every notebook in notebooks/ runs under papermill with profile="smoke" and writes its summary.json.

Notebooks run in order into one shared run folder, as `make run` does, so later notebooks see earlier
artifacts. A notebook with no entry in CHECKS must still write at least one `<stage>/summary.json`.
"""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from rlhf_helpers.run import discover_notebooks, execute_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = discover_notebooks(ROOT / "notebooks")
STANDARD = {"run_dir", "profile", "seed"}


def check_concepts(run_dir: Path) -> None:
    s = json.loads((run_dir / "concepts" / "summary.json").read_text())
    assert s["profile"] == "smoke"
    assert s["ppo_tv_to_optimum"] < 0.1, s
    assert s["dpo_tv_to_optimum"] < 0.1, s
    assert s["bt_fit_max_abs_error"] < 0.5, s


def check_rewards(run_dir: Path) -> None:
    from rlhf_helpers.rewards import load_reward_config

    s = json.loads((run_dir / "rewards" / "summary.json").read_text())
    reward = load_reward_config(run_dir / "rewards" / "reward_config.json")  # round-trips into a reward
    assert set(reward.weights) == set(s["weights"])
    assert s["gold_mean_good"] > s["gold_mean_gaming"] + 0.3, s  # the gold judge is not gamed
    assert s["naive_gaming_top_share"] > s["gold_gaming_top_share"], s  # the naive reward is
    assert 0.5 < s["bayes_ceiling"] <= 1.0
    assert s["searched_spearman_with_gold"] > s["tuned_spearman_with_gold"], s  # the search beats the defaults


def check_sft(run_dir: Path) -> None:
    s = json.loads((run_dir / "sft" / "summary.json").read_text())
    assert s["steps"] >= 1 and s["eval_loss_after"] > 0
    assert (run_dir / "sft" / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "sft" / "model" / "config.json").exists()
    assert 0.0 <= s["win_rate_vs_base"]["win_rate"] <= 1.0 and s["n_compare"] >= 1


def check_rm(run_dir: Path) -> None:
    from rlhf_helpers.preferences import read_pairs

    s = json.loads((run_dir / "rm" / "summary.json").read_text())
    assert s["steps"] >= 1 and 0.0 <= s["eval_accuracy"] <= 1.0 and 0.5 <= s["bayes_ceiling"] <= 1.0
    assert s["normalization"]["scale"] > 0 and s["normalization"]["n"] == 4 * s["fresh_samples_per_prompt"]
    assert [r["n"] for r in s["best_of_n"]] == list(range(1, s["fresh_samples_per_prompt"] + 1))
    assert (run_dir / "rm" / "model" / "normalization.json").exists()
    pairs = read_pairs(run_dir / "preferences" / "pairs.jsonl")  # validates, and carries provenance
    assert len(pairs) == s["n_pairs"] and all("policy" in p.metadata for p in pairs)


def check_eval(run_dir: Path) -> None:
    from rlhf_helpers import check_results
    from rlhf_helpers.config import stage_config
    from rlhf_helpers.evaluate import EvalConfig
    from rlhf_helpers.policies import available_policies
    from rlhf_helpers.report import network_references, read_eval_summary

    s = read_eval_summary(run_dir)  # every field present and well-formed
    assert s["profile"] == "smoke" and s["reference"] == "sft"
    assert [r["policy"] for r in s["policies"]] == available_policies(run_dir)  # every policy present, in order
    n = stage_config(EvalConfig, "smoke").n_prompts
    assert all(0.0 <= r["gold"] <= 1.0 and r["n"] == n for r in s["policies"])
    page = (run_dir / "eval" / "report.html").read_text()
    assert "Plotly" in page and not network_references(page)
    assert check_results.main([str(run_dir)]) == 0  # the artifact checks of a smoke run


def check_comparison(run_dir: Path) -> None:
    from rlhf_helpers.tracking import read_metrics

    s = json.loads((run_dir / "comparison" / "summary.json").read_text())
    rows = {r["policy"]: r for r in s["table"]}
    assert s["profile"] == "smoke" and s["reference"] in rows and {"dpo", "grpo", "rloo", "ppo"} <= set(rows)
    for stage in ("dpo", "grpo", "rloo", "ppo"):
        r, st = rows[stage], json.loads((run_dir / stage / "summary.json").read_text())
        assert (run_dir / stage / "adapter" / "adapter_config.json").exists()
        assert st["steps"] >= 1 and r["samples_seen"] == st["samples_seen"] >= 1 and r["wall_time_s"] > 0
        assert r["peak_memory_mb"] > 0 and r["kl"] is not None and 0.0 <= r["gold"] <= 1.0
        assert r["ci_low"] <= r["win_rate"] <= r["ci_high"] and r["n"] == rows[s["reference"]]["n"]
    for stage in ("grpo", "rloo"):  # the aliases notebook 06 plots for every online stage
        logged = [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if "objective/scores" in r]
        assert logged and all(r.get("objective/gold") is not None and r.get("objective/kl") is not None for r in logged)
    assert s["implicit_reward"]["n_pairs"] >= 1 and 0.0 <= s["implicit_reward"]["dpo_pair_accuracy"] <= 1.0


def check_ppo(run_dir: Path) -> None:
    from rlhf_helpers.tracking import read_metrics

    s = json.loads((run_dir / "ppo" / "summary.json").read_text())
    assert s["steps"] >= 1 and s["reward"] == "rm"  # notebook 03 ran first, so PPO used its reward model
    rows = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, s["steps"] + 1))
    for key in ("objective/scores", "objective/gold", "objective/kl", "policy/clipfrac_avg", "loss/value_avg",
                "val/explained_variance"):
        assert all(key in r for r in rows), key
    samples = read_metrics(run_dir / "ppo" / "samples.jsonl")
    assert samples and all(0.0 <= r["gold"] <= 1.0 for r in samples)  # the gold judge beside each written reply
    assert (run_dir / "ppo" / "adapter" / "adapter_config.json").exists()
    assert s["eval_ppo"]["n"] == s["eval_sft"]["n"] >= 1 and s["eval_sft"]["kl_mean"] == 0.0
    assert 0.0 <= s["win_rate_vs_sft"]["win_rate"] <= 1.0


CHECKS = {"00_rlhf_concepts": check_concepts, "01_reward_design": check_rewards, "02_sft": check_sft,
          "03_reward_model": check_rm, "04_ppo": check_ppo, "05_dpo_vs_ppo": check_comparison,
          "06_evaluation": check_eval}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke_run")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(notebook, run_dir):
    before = set(run_dir.glob("*/summary.json"))
    # a cell time limit: once, with both cores busy with other work, the kernel finished a cell but its reply
    # never reached papermill, which would have waited for ever (a whole smoke notebook takes ~90 s)
    executed = execute_notebook(notebook, run_dir / "notebooks",
                                {"run_dir": str(run_dir), "profile": "smoke", "seed": 0}, timeout_s=600)
    written = set(run_dir.glob("*/summary.json")) - before
    # plotly.js (about 5 MB) is written once, for the saved notebook's and HTML copy's figures, not per figure
    outputs = [o for cell in nbformat.read(executed, as_version=4).cells for o in cell.get("outputs", [])]
    copies = sum(len(o.get("data", {}).get("text/html", "")) > 1_000_000 for o in outputs)
    assert copies <= 1, f"{notebook.name} carries plotly.js {copies} times"
    # library notices a reader can do nothing about stay out of the notebooks (see rlhf_helpers/__init__.py)
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    for notice in ("`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is deprecated",
                   "gemm_4bit_forward", "were not sharded"):
        assert notice not in stderr, f"{notebook.name} prints {notice!r}"
    # the kernel's IPC sockets live in a private temporary folder, not in the repository
    assert not list(ROOT.glob("kernel-ipc*")), "kernel sockets were left in the repository"
    if notebook.stem in CHECKS:
        CHECKS[notebook.stem](run_dir)
    else:
        assert written, f"{notebook.name} wrote no run_dir/<stage>/summary.json"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped_and_has_one_parameters_cell(notebook):
    nb = nbformat.read(str(notebook), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook.name}: exactly one cell must be tagged 'parameters'"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{notebook.name} has outputs"
    names = {line.split(":")[0].strip() for line in tagged[0].source.splitlines() if ":" in line and not line.startswith("#")}
    assert STANDARD <= names, f"{notebook.name}: the parameters cell lacks {STANDARD - names}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_matches_its_jupytext_source(notebook):
    import jupytext

    source = notebook.with_suffix(".py")
    assert source.exists(), f"{notebook.name} has no py:percent pair {source.name}"
    from_py = jupytext.read(str(source))
    committed = nbformat.read(str(notebook), as_version=4)
    strip = lambda cells: [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in cells]
    assert strip(from_py.cells) == strip(committed.cells), (
        f"{notebook.name} is out of sync with {source.name}; run `make notebooks`")


def test_help_notebook_lists_every_parameter_with_type_and_comment():
    nb = ROOT / "notebooks" / "00_rlhf_concepts.ipynb"
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(nb)],
                         capture_output=True, text=True, check=True).stdout
    cell = next(c for c in nbformat.read(str(nb), as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    declared = [line for line in cell.source.splitlines() if ":" in line and "=" in line]
    assert declared
    for line in declared:
        name = line.split(":")[0].strip()
        kind = line.split(":")[1].split("=")[0].strip()
        comment = line.split("#", 1)[1].strip()
        assert f"{name}: {kind}" in out and comment in out, f"{name} missing from --help-notebook:\n{out}"
