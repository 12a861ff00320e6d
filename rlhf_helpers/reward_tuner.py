"""An ipywidgets tuner for the weights of a reward mix.

A slider per component weight and a prompt picker; a ranked table of candidate responses and a plotly
histogram of their rewards that update as sliders move; the rank agreement (Spearman) of the tuned
reward with the gold judge; a button that saves the tuned config as JSON.

Component scores do not depend on the weights, so they are computed once per candidate; moving a slider
only re-weights them. Everything the display shows is also an attribute (`ranking`, `table_rows`,
`figure`, `agreement`), so tests and papermill runs can drive the tuner from Python.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .gold import GoldJudge
from .rewards import RewardFunction, Trajectory, WeightedSum, save_reward_config

ALL_PROMPTS = ""  # the prompt picker's value for "all prompts" (prompt ids are non-empty strings)
GAMING_KINDS = {"stuffed", "prompt_copy", "repetitive", "padded", "unsafe", "over_refusal"}


def rankable(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """`scores` rounded to 12 decimals, the form every ranking here takes. The tuner sums a mix with numpy
    (`component_scores @ w`), `WeightedSum` term by term, and the two sums can differ in the last bit (by up to
    4e-16 on the shipped candidates at notebook 01's weights). That splits or merges ties, which moves average
    ranks and the top quarter: the same mix once ranked with gold at 0.3035 in the tuner and 0.3027 in
    `top_share_table`. Rounding far below any real difference between rewards makes both sums rank alike."""
    return np.round(np.asarray(scores, dtype=float), 12)


def top_quarter_share(scores: np.ndarray, gaming: np.ndarray) -> np.ndarray | float:
    """The share of gaming responses among the top quarter by `scores` ((N,), or (N, W) for W scorings at
    once), ranked as `rankable` rounds them; ties keep the candidates' order. The tuner, its search and
    `top_share_table` all count this way."""
    top = np.argsort(-rankable(scores), axis=0, kind="stable")[: max(1, len(scores) // 4)]
    return np.asarray(gaming)[top].mean(axis=0)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


class RewardTuner:
    """Tune `reward`'s weights against `candidates` (dicts with prompt_id, prompt, response, kind)."""

    def __init__(self, candidates: Sequence[dict[str, Any]], reward: WeightedSum, save_path: str | Path,
                 gold: RewardFunction | None = None, max_weight: float = 1.0, show_widgets: bool = True):
        if not candidates:
            raise ValueError("the tuner needs at least one candidate response")
        self.candidates = list(candidates)
        self.base = reward
        self.save_path = Path(save_path)
        self.names = [fn.name for _, fn in reward.terms]
        trajs = [Trajectory(c["prompt"], c["response"]) for c in self.candidates]
        outs = reward.batch(trajs)
        self.component_scores = np.array([[o.metadata["components"][n] for n in self.names] for o in outs])  # (N, C)
        self.gold_scores = np.array((gold or GoldJudge()).score([t.prompt for t in trajs], [t.response for t in trajs]))
        self.weights = dict(reward.weights)
        self.prompt_id: str | None = None
        self.max_weight = max_weight
        self.figure = None
        self._build_widgets() if show_widgets else None
        self.refresh()

    # --- state ---------------------------------------------------------------------------------
    @property
    def reward(self) -> WeightedSum:
        return self.base.with_weights(self.weights)

    def rewards(self) -> np.ndarray:
        w = np.array([self.weights[n] for n in self.names])  # (C,)
        return self.component_scores @ w  # (N,)

    def selected(self) -> np.ndarray:
        ids = np.array([c["prompt_id"] for c in self.candidates])
        return np.arange(len(ids)) if self.prompt_id is None else np.flatnonzero(ids == self.prompt_id)

    def set_weight(self, name: str, value: float) -> None:
        """Change one weight (through the slider when widgets are shown, so the display follows)."""
        if name not in self.weights:
            raise KeyError(f"no component {name!r}; components: {self.names}")
        if hasattr(self, "sliders"):
            self.sliders[name].value = value  # fires the observer, which refreshes
        else:
            self.weights[name] = float(value)
            self.refresh()

    def set_prompt(self, prompt_id: str | None) -> None:
        """Show one prompt's candidates, or all of them for None (through the picker when widgets are shown)."""
        if hasattr(self, "picker"):
            self.picker.value = ALL_PROMPTS if prompt_id is None else prompt_id
        else:
            self.prompt_id = prompt_id
            self.refresh()

    def refresh(self) -> None:
        idx = self.selected()
        rewards = self.rewards()  # (N,) once per refresh: a slider move re-weights, nothing more
        r = rewards[idx]
        order = idx[np.argsort(-rankable(r), kind="stable")]
        self.ranking = order.tolist()
        self.table_rows = [
            {"rank": k + 1, "prompt_id": self.candidates[i]["prompt_id"], "kind": self.candidates[i].get("kind", ""),
             "reward": float(rewards[i]), "gold": float(self.gold_scores[i]),
             "response": self.candidates[i]["response"]}
            for k, i in enumerate(order)
        ]
        self.agreement = spearman(rankable(r), self.gold_scores[idx])
        gaming = np.array([self.candidates[i].get("kind") in GAMING_KINDS for i in idx])
        self.gaming_top_share = float(top_quarter_share(r, gaming)) if len(idx) else 0.0
        self.figure = self._histogram(idx, rewards)
        if hasattr(self, "table"):
            self._render()

    def search(self, grid: Sequence[float] = (0.0, 0.25, 0.5, 1.0), top: int = 5):
        """Every combination of weights from `grid` (one per component), scored on all candidates as the
        tuner scores its sliders: Spearman with gold and the gaming share of the top quarter. Returns the
        `top` best by Spearman as a DataFrame, one column per weight. Combinations that tie on both numbers
        (multiples of one another always do) are shown once, the first found. 4 values for 8 components is
        4**8 = 65,536 combinations; the all-zero one is skipped, so 65,535 are scored, in about two seconds."""
        import itertools

        import pandas as pd
        from scipy.stats import rankdata

        weights = np.array([w for w in itertools.product(grid, repeat=len(self.names)) if any(w)], dtype=float)
        if not len(weights):
            raise ValueError(f"the grid {tuple(grid)} has no non-zero weight to try")
        scores = self.component_scores @ weights.T  # (N, W)
        ranks = rankdata(rankable(scores), axis=0)  # average ranks for ties, as `spearman` does
        ranks -= ranks.mean(axis=0)
        gold = rankdata(self.gold_scores)
        gold -= gold.mean()
        norm = np.sqrt((ranks ** 2).sum(axis=0) * (gold ** 2).sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where(norm > 0, gold @ ranks / norm, np.nan)
        gaming = np.array([c.get("kind") in GAMING_KINDS for c in self.candidates])
        share = top_quarter_share(scores, gaming)  # (W,)
        table = pd.DataFrame(weights, columns=self.names)
        table["Spearman with gold"], table["gaming share of top quarter"] = rho, share
        table = table.sort_values("Spearman with gold", ascending=False, kind="stable")
        return table.drop_duplicates(["Spearman with gold", "gaming share of top quarter"]).head(top).reset_index(drop=True)

    def save(self, *_: Any) -> Path:
        path = save_reward_config(self.reward, self.save_path)
        if hasattr(self, "status"):
            # the time makes every press visible, also when the path is the one saved before
            self.status.value = f"Saved at {time.strftime('%H:%M:%S')} to <code>{html.escape(str(path))}</code>"
        return path

    # --- display -------------------------------------------------------------------------------
    def _histogram(self, idx: np.ndarray, rewards: np.ndarray):
        import plotly.graph_objects as go

        fig = go.Figure()
        kinds = [self.candidates[i].get("kind", "?") for i in idx]
        for kind in dict.fromkeys(kinds):
            vals = [float(rewards[i]) for i, k in zip(idx, kinds) if k == kind]
            fig.add_trace(go.Histogram(x=vals, name=kind, xbins=dict(start=0, end=max(1.0, sum(self.weights.values())), size=0.05)))
        fig.update_layout(barmode="stack", height=300, margin=dict(l=40, r=10, t=40, b=40),
                          title=f"Tuned reward by kind of response (Spearman with gold: {self.agreement:.2f})",
                          xaxis_title="tuned reward", yaxis_title="responses")
        return fig

    def _build_widgets(self) -> None:
        import ipywidgets as W

        self.sliders = {
            n: W.FloatSlider(value=self.weights[n], min=0.0, max=self.max_weight, step=0.05, description=n,
                             continuous_update=False, readout_format=".2f")
            for n in self.names
        }
        for name, slider in self.sliders.items():
            slider.observe(lambda change, name=name: self._on_slider(name, change["new"]), names="value")
        # "all prompts" needs a value other than None: a Dropdown whose value is None selects nothing, so the
        # browser would show an empty picker and could not go back to all prompts
        options = [("all prompts", ALL_PROMPTS)] + sorted(
            {(f"{c['prompt_id']}: {c['prompt'][:60]}", c["prompt_id"]) for c in self.candidates}, key=lambda o: o[1])
        self.picker = W.Dropdown(options=options, value=ALL_PROMPTS if self.prompt_id is None else self.prompt_id,
                                 description="prompt", layout=W.Layout(width="95%"))
        self.picker.observe(lambda change: self._on_prompt(change["new"]), names="value")
        self.table = W.HTML()
        # the histogram takes the width the sliders leave; it may shrink, they may not
        self.plot = W.Output(layout=W.Layout(flex="1 1 auto", min_width="0"))
        self.button = W.Button(description="Save config", button_style="primary", icon="save")
        self.button.on_click(self.save)
        self.status = W.HTML()
        # flex 0 0 auto: squeezed by the histogram beside them, the sliders' readouts were cut to "0."
        controls = W.VBox([W.HTML("<b>Component weights</b>"), *self.sliders.values()],
                          layout=W.Layout(flex="0 0 auto"))
        self.widget = W.VBox([self.picker, W.HBox([controls, self.plot]), W.HBox([self.button, self.status]), self.table])

    def _on_slider(self, name: str, value: float) -> None:
        self.weights[name] = float(value)
        self.refresh()

    def _on_prompt(self, prompt_id: str | None) -> None:
        self.prompt_id = None if prompt_id in (ALL_PROMPTS, None) else prompt_id
        self.refresh()

    def _table_html(self) -> str:
        """The agreement figures and the ranked table (its first 40 rows) as HTML."""
        rows = "".join(
            f"<tr><td>{r['rank']}</td><td>{html.escape(r['prompt_id'])}</td><td>{html.escape(r['kind'])}</td>"
            f"<td>{r['reward']:.3f}</td><td>{r['gold']:.3f}</td>"
            f"<td style='text-align:left'>{html.escape(r['response'][:160])}{'…' if len(r['response']) > 160 else ''}</td></tr>"
            for r in self.table_rows[:40]
        )
        return (
            f"<p>Spearman rank agreement with the gold judge: <b>{self.agreement:.3f}</b>; "
            f"share of gaming responses in the top quarter: <b>{self.gaming_top_share:.0%}</b></p>"
            "<table class='reward-table'><tr><th>rank</th><th>prompt</th><th>kind</th><th>tuned</th><th>gold</th>"
            f"<th>response</th></tr>{rows}</table>"
        )

    def _render(self) -> None:
        from IPython.display import display

        self.table.value = self._table_html()
        self.plot.clear_output(wait=True)
        with self.plot:
            display(self.figure)

    def static_html(self) -> str:
        """The tuner as it stands, without widgets: its weights, the agreement figures and the ranked table."""
        weights = ", ".join(f"{n} {self.weights[n]:.2f}" for n in self.names)
        scope = "all prompts" if self.prompt_id is None else f"prompt {html.escape(self.prompt_id)}"
        return (f"<p><i>The reward tuner as it was saved ({scope}; weights {weights}). Its sliders need a "
                "running kernel: open the notebook in JupyterLab and run it.</i></p>" + self._table_html())

    def _ipython_display_(self) -> None:
        """The widgets, carrying a static copy (`static_html`) for wherever widgets cannot run: a notebook read
        without its kernel, or its HTML export read offline (`run.export_html` keeps the copy)."""
        from IPython.display import display

        static = {"text/html": self.static_html(), "text/plain": "Reward tuner (widgets: they need a running kernel)"}
        if not hasattr(self, "widget"):
            display(static, raw=True)
            return
        display({**self.widget._repr_mimebundle_(), **static}, raw=True)


# --- candidates: the shipped responses the tuner and notebook 01 work on ---------------------------

def load_candidates(path: str | Path | None = None) -> list[dict[str, Any]]:
    """`data/reward_candidates.jsonl` (or `path`) as dicts with prompt_id, domain, prompt, response, kind."""
    from .data import DataError, read_jsonl
    from .paths import data_path

    path = Path(path) if path else data_path("reward_candidates.jsonl")
    rows = []
    for line_no, row in read_jsonl(path):
        for key in ("prompt_id", "prompt", "response", "kind"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError("missing or empty", path=str(path), line=line_no, field=key,
                                hint="each candidate has prompt_id, prompt, response and kind strings")
        rows.append(row)
    return rows


def score_table(candidates: Sequence[dict[str, Any]], scorers: dict[str, RewardFunction]):
    """A pandas table: one row per candidate, a column per scorer."""
    import pandas as pd

    prompts = [c["prompt"] for c in candidates]
    responses = [c["response"] for c in candidates]
    table = pd.DataFrame({"prompt_id": [c["prompt_id"] for c in candidates], "kind": [c["kind"] for c in candidates]})
    for name, fn in scorers.items():
        table[name] = fn.score(prompts, responses)
    table["response"] = [r if len(r) <= 90 else r[:90] + "…" for r in responses]
    return table


def candidate_pairs(candidates: Sequence[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """Every within-prompt pair of candidate responses, as parallel lists (prompts, a, b)."""
    prompts, a, b = [], [], []
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for c in candidates:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    for group in by_prompt.values():
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                prompts.append(group[i]["prompt"])
                a.append(group[i]["response"])
                b.append(group[j]["response"])
    return prompts, a, b


def top_share_table(table, scorers: Sequence[str], gaming_kinds=GAMING_KINDS):
    """Per scorer: the share of gaming responses among its top quarter, and its Spearman with `gold`."""
    import pandas as pd

    gaming = table["kind"].isin(gaming_kinds).to_numpy()
    rows = {}
    for name in scorers:
        rows[name] = {"gaming share of top quarter": float(top_quarter_share(table[name].to_numpy(), gaming)),
                      "Spearman with gold": spearman(rankable(table[name]), table["gold"]) if "gold" in table
                      else float("nan")}
    return pd.DataFrame(rows).T
