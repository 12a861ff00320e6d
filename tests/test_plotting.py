"""Plotting helpers in a real kernel: what a notebook user sees, not just the figure objects."""
import nbformat
import pytest
from nbclient import NotebookClient

LIVE = """\
from rlhf_helpers import plotting
live = plotting.LiveCurves(["loss", "accuracy"], title="live")
for step in range(1, 5):
    live.update({"step": step, "loss": 1.0 / step, "accuracy": step / 4})
"""


def test_live_curves_redraw_one_figure_in_place():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(LIVE)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 1, [o.get("output_type") for o in outputs]  # updated in place, not stacked
    traces = figures[0]["data"]["application/vnd.plotly.v1+json"]["data"]
    assert [list(t["x"]) for t in traces] == [[1, 2, 3, 4], [1, 2, 3, 4]]  # the last update's rows
    assert list(traces[0]["y"]) == [1.0, 0.5, 1.0 / 3, 0.25]


AGAIN = """\
from IPython.display import display
again = plotting.LiveCurves(["loss"], title="again")
for step in range(1, 4):
    again.update({"step": step, "loss": 1.0 / step})
display(plotting.metric_curves(again.rows, ["loss"]))
"""


def _plotlyjs_copies(cell) -> int:
    """Outputs that carry the plotly.js library itself (several MB of script), not a figure."""
    return sum(len(o.get("data", {}).get("text/html", "")) > 1_000_000 for o in cell.outputs)


def test_live_curves_write_plotlyjs_once_per_kernel(monkeypatch):
    # A figure's own _repr_mimebundle_ re-activates plotly's notebook renderer on every call, and each
    # activation writes all of plotly.js as a new output: 5 MB per update of a training curve. The
    # renderer is the one `rlhf_helpers.run` gives papermill runs, so saved notebooks draw offline.
    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype+notebook")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(LIVE), nbformat.v4.new_code_cell(AGAIN)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    assert [_plotlyjs_copies(cell) for cell in nb.cells] == [1, 0]


def test_rise_table_reads_both_halves_from_an_rl_summary():
    from rlhf_helpers.plotting import rise_table
    from rlhf_helpers.tracking import half_means

    rows = [{"step": i, "objective/scores": s, "objective/gold": g}
            for i, (s, g) in enumerate([(0.0, 0.5), (1.0, 0.5), (2.0, 0.7), (4.0, 0.9)], start=1)]
    table = rise_table({"scores_halves": half_means(rows, "objective/scores"),
                        "gold_halves": half_means(rows, "objective/gold")})
    proxy = "score optimised: proxy − EOS penalty (objective/scores)"
    assert list(table.index) == [proxy, "gold (objective/gold)"]
    assert table.loc[proxy, "change"] == 2.5  # (2 + 4) / 2 - (0 + 1) / 2
    assert table.loc["gold (objective/gold)", "change"] == 0.3  # rounded to 3 places


def test_cost_figure_puts_methods_at_their_seconds_per_sample():
    from rlhf_helpers.plotting import cost_figure

    table = [{"policy": "sft", "gold": 0.70},
             {"policy": "ppo", "gold": 0.71, "seconds_per_sample": 4.3, "memory_added_mb": 900.0, "wall_time_s": 550,
              "samples_seen": 128},
             {"policy": "dpo", "gold": 0.72, "seconds_per_sample": 1.4, "memory_added_mb": None, "wall_time_s": 110,
              "samples_seen": 80},
             {"policy": "grpo", "gold": 0.73, "seconds_per_sample": None, "wall_time_s": 160}]  # no cost: left out
    fig = cost_figure(table)
    assert [(t.name, t.x[0], t.y[0]) for t in fig.data] == [("ppo", 4.3, 0.71), ("dpo", 1.4, 0.72)]
    assert fig.data[0].marker.size > fig.data[1].marker.size  # the marker grows with the memory added
    assert "memory not recorded" in fig.data[1].hovertemplate
    assert fig.layout.xaxis.title.text == "training seconds per sample"


def test_curves_title_each_y_axis_with_its_metric_unit():
    from rlhf_helpers import plotting

    rows = [{"step": s, "train/loss": 1.0 / s, "train/accuracy": 0.5 + s / 10, "made/up": s} for s in (1, 2, 3)]
    fig = plotting.metric_curves(rows, ["train/loss", "train/accuracy", "made/up"])
    assert [fig.layout[f"yaxis{i}"].title.text for i in ("", 2, 3)] == ["loss", "share of pairs", None]
    staged = plotting.stage_curves({"rm": rows}, {"rm": ["train/accuracy", "made/up"]})
    assert [staged.layout[f"yaxis{i}"].title.text for i in ("", 2)] == ["share of pairs", None]
    # an evaluation logged once, at the last step, sits at the end of the stage's steps with its value beside it
    rows = [{"step": s, "train/loss": 0.7 - 0.01 * s} for s in range(1, 11)] + [{"step": 10, "eval/accuracy": 0.606}]
    staged = plotting.stage_curves({"rm": rows}, {"rm": ["train/loss", "eval/accuracy"]})
    assert tuple(staged.layout.xaxis2.range) == pytest.approx((0.64, 10.36)) == tuple(staged.layout.xaxis.range)
    assert staged.data[1].text == ("0.606",) and staged.data[0].text is None


def test_rise_table_shows_every_rise_an_online_stage_summary_reports():
    from rlhf_helpers.plotting import rise_table
    from rlhf_helpers.tracking import RISE_KEYS, half_means, rise_halves

    rows = [{"step": s, **{key: float(s * (i + 1)) for i, key in enumerate(RISE_KEYS.values())}} for s in range(1, 5)]
    halves = rise_halves(iter(rows))  # any iterable of rows, read once
    assert halves == {name: half_means(rows, key) for name, key in RISE_KEYS.items()}
    assert halves["eos_frac_halves"]["change"] == 2 * 3.0  # response/eos_frac is the third key: s * 3
    assert len(rise_table(halves)) == 4
