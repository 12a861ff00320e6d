"""Plotly figure builders for the notebooks.

Each function is independent: it takes plain numbers (lists, NumPy arrays or CPU tensors, or metric rows as
read from `metrics.jsonl`) and returns a `plotly.graph_objects.Figure`; the notebook calls `.show()`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLORS = {
    "ref": "#7f7f7f",
    "optimum": "#2ca02c",
    "ppo": "#1f77b4",
    "dpo": "#d62728",
    "reward": "#ff7f0e",
}


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x, dtype=float)


def _arm_labels(k: int) -> list[str]:
    return [f"arm {i}" for i in range(k)]


# ----------------------------------------------------------------------------------------------------------
# Notebook 00: RLHF concepts
# ----------------------------------------------------------------------------------------------------------

def pipeline_diagram() -> go.Figure:
    """The RLHF pipeline as boxes and arrows: SFT → reward model → PPO, and DPO as the shortcut."""
    boxes = {  # name: (x, y, label, colour)
        "base": (0.0, 1.0, "Pretrained LM", COLORS["ref"]),
        "sft": (1.5, 1.0, "SFT<br>(demonstrations)", COLORS["ref"]),
        "prefs": (3.0, 2.0, "Preference pairs<br>(y_w ≻ y_l)", COLORS["reward"]),
        "rm": (4.5, 2.0, "Reward model<br>r(x, y)", COLORS["reward"]),
        "ppo": (6.0, 2.0, "RL (PPO)<br>max E[r] − β·KL", COLORS["ppo"]),
        "dpo": (4.5, 0.0, "DPO<br>one classification loss", COLORS["dpo"]),
        "aligned": (7.5, 1.0, "Aligned policy π", COLORS["optimum"]),
    }
    arrows = [
        ("base", "sft", ""), ("sft", "prefs", "sample"), ("prefs", "rm", "fit BT"), ("rm", "ppo", "reward"),
        ("ppo", "aligned", ""), ("prefs", "dpo", "no RM, no RL"), ("dpo", "aligned", ""),
    ]
    fig = go.Figure()
    for src, dst, text in arrows:
        x0, y0 = boxes[src][:2]
        x1, y1 = boxes[dst][:2]
        fig.add_annotation(x=x1 - 0.55 * np.sign(x1 - x0), y=y1, ax=x0 + 0.55 * np.sign(x1 - x0), ay=y0,
                           xref="x", yref="y", axref="x", ayref="y", showarrow=True, arrowhead=3,
                           arrowwidth=1.5, text="")
        if text:
            fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2 + 0.18, text=f"<i>{text}</i>",
                               showarrow=False, font=dict(size=11))
    for x, y, label, colour in boxes.values():
        fig.add_shape(type="rect", x0=x - 0.55, x1=x + 0.55, y0=y - 0.3, y1=y + 0.3, line=dict(color=colour),
                      fillcolor=colour, opacity=0.25, layer="below")
        fig.add_annotation(x=x, y=y, text=label, showarrow=False, font=dict(size=12))
    fig.update_xaxes(visible=False, range=[-0.7, 8.2])
    fig.update_yaxes(visible=False, range=[-0.5, 2.5])
    fig.update_layout(title="The RLHF pipeline, and DPO's shortcut", height=320, showlegend=False,
                      margin=dict(l=10, r=10, t=40, b=10), plot_bgcolor="white")
    return fig


def bradley_terry_figure(
    binned: Mapping[str, Sequence[float]], r_true: Any, r_fit: Any
) -> go.Figure:
    """Left: σ(Δr) with the empirical binned preference frequencies. Right: fitted against true rewards."""
    r_true, r_fit = _np(r_true), _np(r_fit)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "P(a ≻ b) against r_a − r_b", "Maximum-likelihood fit against the truth"))
    dx = np.linspace(min(binned["reward_diff"]) - 0.5, max(binned["reward_diff"]) + 0.5, 200)
    fig.add_trace(go.Scatter(x=dx, y=1 / (1 + np.exp(-dx)), name="σ(r_a − r_b)",
                             line=dict(color=COLORS["optimum"])), row=1, col=1)
    fig.add_trace(go.Scatter(x=binned["reward_diff"], y=binned["frequency"], mode="markers",
                             name="empirical frequency", text=[f"{c} comparisons" for c in binned["count"]],
                             marker=dict(color=COLORS["reward"], size=9)), row=1, col=1)
    lim = [min(r_true.min(), r_fit.min()) - 0.3, max(r_true.max(), r_fit.max()) + 0.3]
    fig.add_trace(go.Scatter(x=lim, y=lim, mode="lines", name="y = x", line=dict(color="black", dash="dot")),
                  row=1, col=2)
    fig.add_trace(go.Scatter(x=r_true, y=r_fit, mode="markers+text", name="items",
                             text=[str(i) for i in range(len(r_true))], textposition="top center",
                             marker=dict(color=COLORS["ppo"], size=10)), row=1, col=2)
    fig.update_xaxes(title_text="reward difference r_a − r_b", row=1, col=1)
    fig.update_yaxes(title_text="P(a preferred)", range=[-0.02, 1.02], row=1, col=1)
    fig.update_xaxes(title_text="true reward (mean 0)", row=1, col=2)
    fig.update_yaxes(title_text="fitted reward (mean 0)", row=1, col=2)
    fig.update_layout(height=380, title="Bradley–Terry: preferences are noisy comparisons of rewards")
    return fig


def kl_optimum_slider(pi_ref: Any, r: Any, sweep: Mapping[str, Sequence], beta_start: float | None = None
                      ) -> go.Figure:
    """Bars of π_ref and π* (left) and r (right), with a slider over β; `sweep` comes from `beta_sweep`."""
    pi_ref, r = _np(pi_ref), _np(r)
    arms = _arm_labels(len(r))
    betas = list(sweep["beta"])
    start = int(np.argmin(np.abs(np.log(betas) - np.log(beta_start)))) if beta_start else len(betas) // 2

    def title(i: int) -> str:
        return (f"β = {betas[i]:.3g}: E_π*[r] = {sweep['expected_reward'][i]:.3f}, "
                f"KL(π*‖π_ref) = {sweep['kl'][i]:.3f}")

    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38],
                        subplot_titles=("π_ref and π* ∝ π_ref·exp(r/β)", "reward r"))
    fig.add_trace(go.Bar(x=arms, y=pi_ref, name="π_ref", marker_color=COLORS["ref"]), row=1, col=1)
    fig.add_trace(go.Bar(x=arms, y=sweep["policy"][start], name="π*", marker_color=COLORS["optimum"]),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=arms, y=r, name="r", marker_color=COLORS["reward"]), row=1, col=2)
    fig.frames = [go.Frame(name=f"{b:.3g}", data=[go.Bar(y=sweep["policy"][i])], traces=[1],
                           layout=go.Layout(title_text=title(i))) for i, b in enumerate(betas)]
    steps = [dict(method="animate", label=f"{b:.2g}",
                  args=[[f"{b:.3g}"], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                           transition=dict(duration=0))]) for b in betas]
    fig.update_layout(
        title=title(start), barmode="group", height=430,
        sliders=[dict(active=start, steps=steps, currentvalue=dict(prefix="β = "), pad=dict(t=40))],
    )
    fig.update_yaxes(title_text="probability", range=[0, 1], row=1, col=1)
    return fig


def reward_kl_frontier(sweep: Mapping[str, Sequence], beta_mark: float | None = None,
                       points: Mapping[str, tuple[float, float]] | None = None) -> go.Figure:
    """E_π*[r] against KL(π*‖π_ref) as β varies; optional marker at `beta_mark` and extra named points."""
    fig = go.Figure(go.Scatter(x=sweep["kl"], y=sweep["expected_reward"], mode="lines+markers",
                               text=[f"β = {b:.3g}" for b in sweep["beta"]], name="π*(β)",
                               line=dict(color=COLORS["optimum"]), marker=dict(size=5)))
    if beta_mark is not None:
        i = int(np.argmin(np.abs(np.log(sweep["beta"]) - np.log(beta_mark))))
        fig.add_trace(go.Scatter(x=[sweep["kl"][i]], y=[sweep["expected_reward"][i]], mode="markers",
                                 name=f"β ≈ {sweep['beta'][i]:.3g}", marker=dict(size=13, symbol="star",
                                                                                  color="black")))
    for name, (kl, reward) in (points or {}).items():
        fig.add_trace(go.Scatter(x=[kl], y=[reward], mode="markers", name=name, marker=dict(size=11)))
    fig.update_layout(title="The reward–KL frontier: each β buys reward with divergence from π_ref",
                      xaxis_title="KL(π‖π_ref)", yaxis_title="E_π[r]", height=380)
    return fig


def ppo_clip_figure(rho: Any, objective_pos: Any, objective_neg: Any, eps: float) -> go.Figure:
    """The clipped surrogate against the ratio ρ for A > 0 and A < 0, flat (zero-gradient) regions shaded."""
    rho = _np(rho)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("A > 0 (a good action)", "A < 0 (a bad action)"))
    for col, (obj, sign) in enumerate([(_np(objective_pos), 1), (_np(objective_neg), -1)], start=1):
        fig.add_trace(go.Scatter(x=rho, y=sign * rho, name="ρ·A (unclipped)", showlegend=col == 1,
                                 line=dict(color=COLORS["ref"], dash="dot")), row=1, col=col)
        fig.add_trace(go.Scatter(x=rho, y=obj, name="min(ρA, clip(ρ)A)", showlegend=col == 1,
                                 line=dict(color=COLORS["ppo"], width=3)), row=1, col=col)
        x0, x1 = (1 + eps, rho.max()) if sign > 0 else (rho.min(), 1 - eps)
        fig.add_vrect(x0=x0, x1=x1, fillcolor=COLORS["dpo"], opacity=0.12, line_width=0, row=1, col=col,
                      annotation_text="flat: gradient 0", annotation_position="top left")
        fig.add_vline(x=1.0, line=dict(color="black", width=1, dash="dash"), row=1, col=col)
        fig.update_xaxes(title_text="ratio ρ = π(y)/π_old(y)", row=1, col=col)
    fig.update_yaxes(title_text="surrogate objective (|A| = 1)", row=1, col=1)
    fig.update_layout(title=f"PPO's clipped surrogate, ε = {eps}", height=380)
    return fig


def dpo_loss_figure(margin: Any, loss: Any, gradient_weight: Any | None = None) -> go.Figure:
    """DPO loss against the implicit reward margin r̂(y_w) − r̂(y_l); optionally the gradient weight σ(−m)."""
    margin = _np(margin)
    fig = go.Figure(go.Scatter(x=margin, y=_np(loss), name="−log σ(margin)", line=dict(color=COLORS["dpo"],
                                                                                         width=3)))
    if gradient_weight is not None:
        fig.add_trace(go.Scatter(x=margin, y=_np(gradient_weight), name="gradient weight σ(−margin)",
                                 line=dict(color=COLORS["ref"], dash="dot")))
    fig.add_vline(x=0.0, line=dict(color="black", width=1, dash="dash"))
    fig.update_layout(title="DPO: a logistic loss on the implicit reward margin",
                      xaxis_title="implicit reward margin r̂(y_w) − r̂(y_l)", yaxis_title="loss", height=360)
    return fig


def bandit_convergence(rows: Sequence[Mapping[str, Any]], keys: Mapping[str, str], log_y: bool = True,
                       title: str = "Distance to the closed-form optimum π*") -> go.Figure:
    """Curves of metric `keys` ({key: legend name}) against `step`, from metric rows (`metrics.jsonl`)."""
    fig = go.Figure()
    for key, name in keys.items():
        pts = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if log_y:
            pts = [(s, max(v, 1e-8)) for s, v in pts]  # exact zeros would vanish from a log axis
        colour = COLORS["ppo"] if key.startswith("ppo") else COLORS["dpo"] if key.startswith("dpo") else None
        fig.add_trace(go.Scatter(x=[s for s, _ in pts], y=[v for _, v in pts], name=name, mode="lines",
                                 line=dict(color=colour, dash="dot" if "kl" in key else "solid")))
    fig.update_layout(title=title, xaxis_title="iteration", height=380)
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


def policy_bars(policies: Mapping[str, Any]) -> go.Figure:
    """Grouped bars of several policies over the same arms ({name: probabilities})."""
    fig = go.Figure()
    palette = {"π_ref": COLORS["ref"], "π*": COLORS["optimum"], "π_PPO": COLORS["ppo"],
               "π_DPO": COLORS["dpo"]}
    for name, probs in policies.items():
        probs = _np(probs)
        fig.add_trace(go.Bar(x=_arm_labels(len(probs)), y=probs, name=name, marker_color=palette.get(name)))
    fig.update_layout(title="Final policies", barmode="group", yaxis_title="probability", height=360)
    return fig


# --- notebook 01: rewards ---------------------------------------------------------------------------

def rewards_by_kind(table, columns, gaming_kinds=()):
    """A strip plot per reward column: one dot per response, grouped by kind; gaming kinds in red."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds = list(dict.fromkeys(table["kind"]))
    fig = make_subplots(rows=1, cols=len(columns), shared_yaxes=True, subplot_titles=list(columns))
    for col_i, column in enumerate(columns, start=1):
        for kind in kinds:
            rows = table[table["kind"] == kind]
            fig.add_trace(go.Box(x=rows[column], y=[kind] * len(rows), name=kind, boxpoints="all", jitter=0.4,
                                 orientation="h", fillcolor="rgba(0,0,0,0)", line=dict(width=0),
                                 marker=dict(color="crimson" if kind in gaming_kinds else "steelblue", size=7),
                                 hovertext=rows["response"], showlegend=False), row=1, col=col_i)
        fig.update_xaxes(title_text=f"{column} reward", range=[-0.05, 1.05], row=1, col=col_i)
    fig.update_layout(height=60 + 32 * len(kinds), title="Each response scored by each reward (red: written to game)",
                      margin=dict(l=110, r=20, t=70, b=40))
    return fig


def bt_label_frequencies(freq, temperature):
    """Observed share of 'a preferred' per bin of gold difference, against the Bradley–Terry curve."""
    import numpy as np
    import plotly.graph_objects as go

    lo, hi = min(freq["delta"]) - 0.05, max(freq["delta"]) + 0.05
    xs = np.linspace(lo, hi, 200)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=1 / (1 + np.exp(-xs / temperature)), name=f"σ(Δ/T), T={temperature}",
                             line=dict(color="gray")))
    fig.add_trace(go.Scatter(x=freq["delta"], y=freq["observed"], mode="markers", name="observed labels",
                             marker=dict(size=[6 + 2 * np.sqrt(n) for n in freq["pairs"]], color="crimson"),
                             text=[f"{n} pairs" for n in freq["pairs"]]))
    fig.update_layout(height=350, title="The simulated annotator follows Bradley–Terry",
                      xaxis_title="gold(a) − gold(b)", yaxis_title="P(a preferred)")
    return fig


def bayes_ceiling_curve(ceilings, current_temperature=None):
    """The Bayes ceiling (best achievable label accuracy) against the annotator temperature."""
    import plotly.graph_objects as go

    temps = sorted(ceilings)
    fig = go.Figure(go.Scatter(x=temps, y=[ceilings[t] for t in temps], mode="lines+markers", name="Bayes ceiling"))
    if current_temperature is not None:
        fig.add_vline(x=current_temperature, line_dash="dot", annotation_text="this run's annotator")
    fig.update_layout(height=320, title="How noisy labels cap any reward model's accuracy",
                      xaxis=dict(title="annotator temperature T", type="log"), yaxis=dict(title="accuracy", range=[0.45, 1.02]))
    return fig


# --- training curves ---------------------------------------------------------------------------------

METRIC_UNITS = {
    "objective/kl": "nats per reply", "objective/entropy": "nats per reply", "policy/entropy_avg": "nats per token",
    "policy/approxkl_avg": "nats per token", "response/length_mean": "tokens", "objective/scores": "reward",
    "objective/raw_scores": "reward", "objective/gold": "gold (0 to 1)", "policy/clipfrac_avg": "share of tokens",
    "val/clipfrac_avg": "share of tokens", "response/eos_frac": "share of replies",
    "val/explained_variance": "share of variance", "train/loss": "loss", "eval/loss": "loss",
    "train/mean_token_accuracy": "share of tokens", "train/grad_norm": "gradient norm",
    "train/learning_rate": "learning rate", "train/accuracy": "share of pairs", "eval/accuracy": "share of pairs",
    "rewards/margins": "reward margin", "rewards/accuracies": "share of pairs", "logps/chosen": "log-prob (nats)",
    "completions/mean_length": "tokens", "loss/policy_avg": "loss", "ppo/tv_to_optimum": "total variation",
    "dpo/tv_to_optimum": "total variation",
}
"""The y-axis title `metric_curves` and `stage_curves` give a metric key (keys not listed get none)."""


def metric_curves(rows, keys, title="Training curves", x="step", cols=3):
    """One line per metric key present in `rows` (dicts from metrics.jsonl), each on its own subplot,
    `cols` subplots to a row, the y axis titled with the key's unit (`METRIC_UNITS`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = [k for k in keys if any(k in r for r in rows)]
    n_cols = max(1, min(len(keys), cols))
    n_rows = max(1, -(-len(keys) // n_cols))
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=keys or ["(no data yet)"])
    for i, key in enumerate(keys):
        pts = [(r[x], r[key]) for r in rows if key in r and r[key] is not None]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=key,
                                 showlegend=False), row=i // n_cols + 1, col=i % n_cols + 1)
        fig.update_xaxes(title_text=x, row=i // n_cols + 1, col=i % n_cols + 1)
        fig.update_yaxes(title_text=METRIC_UNITS.get(key), row=i // n_cols + 1, col=i % n_cols + 1)
    fig.update_layout(height=60 + 260 * n_rows, title=title, margin=dict(l=60, r=20, t=70, b=40))
    return fig


def overlay_curves(rows, keys, title="", x="step", yaxis_title=""):
    """Several metric keys from `rows` as lines on one shared axis (e.g. proxy and gold reward)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for key in keys:
        pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=key))
    fig.update_layout(height=340, title=title, xaxis_title=x, yaxis_title=yaxis_title,
                      margin=dict(l=40, r=20, t=60, b=40))
    return fig


def show_source(fn):
    """The source code of `fn`, syntax-highlighted in a notebook (to read the code beside its explanation)."""
    import inspect

    from IPython.display import Code

    return Code(inspect.getsource(fn), language="python")


class LiveCurves:
    """A figure that redraws itself in place as rows arrive (JupyterLab and papermill alike).

    >>> live = LiveCurves(["train/loss", "eval/loss"])
    >>> logger.add_callback(live.update)   # or MetricsCallback(logger, on_row=live.update)

    The figure goes out as a raw mime bundle under one display id. Displaying the plotly figure object
    itself would not do: IPython hands it to the figure's own `_ipython_display_`, which shows a new
    output and ignores the display id, so every update would stack another figure below the last. Nor
    does the figure's `_repr_mimebundle_`: it re-activates the renderers on every call, and the notebook
    renderer's activation writes all of plotly.js (about 5 MB) as another output each time. The bundle
    is built as `plotly.io.show` builds it, which activates them once per kernel.
    """

    def __init__(self, keys, title="Training curves (live)", every=1, cols=3):
        from IPython.display import display

        self.keys, self.title, self.every, self.cols, self.rows = list(keys), title, every, cols, []
        self.handle = display(self._bundle(), raw=True, display_id=True)

    def _bundle(self) -> dict:
        """The current figure as {mimetype: data}, as plotly's active renderer would show it (plain text
        where there is none, as outside a notebook)."""
        import plotly.io as pio

        fig = metric_curves(self.rows, self.keys, self.title, cols=self.cols)
        if not pio.renderers.default:
            bundle = {}
        elif hasattr(pio.renderers, "_build_mime_bundle"):  # plotly's own, private: what plotly.io.show uses
            bundle = pio.renderers._build_mime_bundle(fig.to_dict())
        else:  # should plotly rename it: a working figure, even if it writes plotly.js again
            bundle = fig._repr_mimebundle_()
        return bundle or {"text/plain": f"{self.title}: {len(self.rows)} rows of {', '.join(self.keys)}"}

    def update(self, row):
        self.rows.append(row)
        if self.handle is not None and len(self.rows) % self.every == 0:
            self.handle.update(self._bundle(), raw=True)


def halves_table(halves: dict):
    """`tracking.half_means` results as a table: one row per label (first half, second half, change, its
    standard error), rounded; labels whose halves are missing (None) are left out."""
    import pandas as pd

    return pd.DataFrame({k: v for k, v in halves.items() if v}).T.astype(float).round(3)


def rise_table(summary):
    """Did anything rise? An online RL stage's summary (PPO, GRPO, RLOO) as a table of the mean over the first
    and the second half of the steps, the change and its standard error (`tracking.half_means`), for: the
    score optimised (the reward model's, minus the missing-EOS penalty), the reward model's score alone, the
    share of replies that ended before the token cap, and the gold reward. Rows the summary lacks are left out."""
    return halves_table({"score optimised: proxy − EOS penalty (objective/scores)": summary.get("scores_halves"),
                         "proxy alone (objective/raw_scores)": summary.get("raw_scores_halves"),
                         "replies that ended (response/eos_frac)": summary.get("eos_frac_halves"),
                         "gold (objective/gold)": summary.get("gold_halves")})


def paired_scores(table, x_col, y_col, title=None):
    """One dot per prompt: policy X's score against policy Y's; above the diagonal, Y won."""
    import plotly.graph_objects as go

    hover = [f"{d}: {p[:80]}" for d, p in zip(table["domain"], table["prompt"])] if "prompt" in table else None
    fig = go.Figure(go.Scatter(x=table[x_col], y=table[y_col], mode="markers", text=hover,
                               marker=dict(size=9, opacity=0.7)))
    fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line=dict(dash="dot", color="gray"))
    fig.update_layout(height=380, width=420, title=title or f"{y_col} against {x_col} (above the line: {y_col.split()[0]} wins)",
                      xaxis=dict(title=x_col, range=[-0.05, 1.05]), yaxis=dict(title=y_col, range=[-0.05, 1.05]))
    return fig


# --- notebook 03: preferences and the reward model ------------------------------------------------------

def pairs_table(pairs, width=160):
    """Preference pairs as a small table: prompt, chosen, rejected, both gold rewards, P(label)."""
    import pandas as pd

    cut = lambda s: s if len(s) <= width else s[:width] + "…"
    return pd.DataFrame([{"prompt": cut(p.prompt), "chosen": cut(p.chosen), "rejected": cut(p.rejected),
                          "gold chosen": round(p.metadata.get("gold_chosen", float("nan")), 3),
                          "gold rejected": round(p.metadata.get("gold_rejected", float("nan")), 3),
                          "P(this label)": round(p.metadata.get("p_chosen", float("nan")), 3)} for p in pairs])


def calibration_figure(bins):
    """Predicted P(chosen ≻ rejected) against how often it happened; the diagonal is perfect calibration."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="calibrated"))
    fig.add_trace(go.Scatter(x=bins["predicted"], y=bins["observed"], mode="lines+markers", name="reward model",
                             marker=dict(size=[6 + 1.5 * c ** 0.5 for c in bins["count"]]),
                             text=[f"{c} comparisons" for c in bins["count"]]))
    fig.update_layout(height=360, width=420, title="Calibration on held-out pairs",
                      xaxis=dict(title="predicted P(first preferred)", range=[0, 1]),
                      yaxis=dict(title="observed frequency", range=[0, 1]))
    return fig


def best_of_n_figure(rows, proxy_name="reward model"):
    """Gold of best-of-n against its KL bound (rows from `evaluate.best_of_n`): picked by the proxy (with the
    95% interval of its gain over a random reply), by the gold judge (the ceiling) and at random."""
    import plotly.graph_objects as go

    x = [r["kl_bound"] for r in rows]
    labels = [f"best of {r['n']}" for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=[r["by_gold"] for r in rows], mode="lines+markers", name="picked by gold (ceiling)",
                             text=labels, line=dict(dash="dash")))
    fig.add_trace(go.Scatter(x=x, y=[r["by_proxy"] for r in rows], mode="lines+markers", name=f"picked by {proxy_name}",
                             text=labels, error_y=dict(type="data", symmetric=False,
                                                       array=[r["gain_ci_high"] - r["gain"] for r in rows],
                                                       arrayminus=[r["gain"] - r["gain_ci_low"] for r in rows])))
    fig.add_trace(go.Scatter(x=x, y=[r["random"] for r in rows], mode="lines", name="a random reply",
                             line=dict(color="gray", dash="dot")))
    fig.update_layout(height=380, width=620, title=f"Best-of-n on {rows[0]['prompts']} held-out prompts: what picking "
                      f"by the {proxy_name} buys", xaxis_title="KL to the sampling policy, log n − (n−1)/n (nats)",
                      yaxis_title="gold reward")
    return fig


def chosen_rejected_histogram(chosen, rejected):
    """Normalised reward of chosen and rejected responses, overlaid."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Histogram(x=list(chosen), name="chosen", opacity=0.6, nbinsx=25))
    fig.add_trace(go.Histogram(x=list(rejected), name="rejected", opacity=0.6, nbinsx=25))
    fig.update_layout(barmode="overlay", height=320, title="Reward-model scores of chosen and rejected responses",
                      xaxis_title="normalised reward", yaxis_title="responses")
    return fig


# --- notebook 06: evaluation ----------------------------------------------------------------------------

POLICY_COLORS = {"base": "#7f7f7f", "sft": "#2ca02c", "ppo": "#1f77b4", "dpo": "#d62728", "grpo": "#9467bd",
                 "rloo": "#8c564b", "rm": "#ff7f0e", "concepts": "#17becf"}
"""One colour per policy (and per stage in the curves), the same in every notebook-06 figure."""


def win_rate_bars(table, reference="sft"):
    """Each policy's gold win rate against `reference` with its bootstrap 95% interval; 0.5 is a draw.
    `table`: rows of `evaluate.results_table`."""
    import plotly.graph_objects as go

    rows = [r for r in table if r.get("win_rate") is not None]
    fig = go.Figure(go.Bar(
        x=[r["policy"] for r in rows], y=[r["win_rate"] for r in rows],
        marker_color=[POLICY_COLORS.get(r["policy"], "#17becf") for r in rows],
        error_y=dict(type="data", symmetric=False, array=[r["ci_high"] - r["win_rate"] for r in rows],
                     arrayminus=[r["win_rate"] - r["ci_low"] for r in rows]),
        text=[f"{r['win_rate']:.2f} (n={r['n']})" for r in rows], textposition="auto", cliponaxis=False))
    fig.add_hline(y=0.5, line=dict(dash="dot", color="gray"), annotation_text="as good as " + reference)
    fig.update_layout(height=360, title=f"Win rate against {reference} by the gold judge (ties half), bootstrap 95% CI",
                      yaxis=dict(title="win rate", range=[0, 1.08]), xaxis_title="policy")
    return fig


def gold_kl_frontier(points, reference="sft"):
    """Gold reward against KL to the reference (the axes of the DPO paper's frontier plot; trained on a proxy and
    scored by gold, the points lie on or below the unknown gold frontier): each policy a large
    marker (all prompts); each stage's checkpoints small markers on a dotted line that runs from the
    reference through the checkpoints to the final policy, every point of a line on the checkpoint prompts.
    `points`: rows of `evaluate.frontier_points`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    line_ends = {p["policy"]: p for p in points if p["kind"] == "line"}
    for stage in dict.fromkeys(p["policy"] for p in points if p["kind"] == "checkpoint"):
        line = ([line_ends[reference]] if reference in line_ends else []) + sorted(
            (p for p in points if p["kind"] == "checkpoint" and p["policy"] == stage), key=lambda p: p["step"]) + (
            [line_ends[stage]] if stage in line_ends else [])
        line = [p for p in line if p["kl"] is not None and p["gold"] is not None]
        fig.add_trace(go.Scatter(
            x=[p["kl"] for p in line], y=[p["gold"] for p in line], mode="lines+markers", name=f"{stage} checkpoints",
            line=dict(color=POLICY_COLORS.get(stage), width=1, dash="dot"), marker=dict(size=6),
            text=[f"{p['policy']} " + (f"step {p['step']}" if p["step"] is not None else
                                       "(line start)" if p["policy"] == reference else "(final)") + f", n={p['n']}"
                  for p in line],
            hovertemplate="%{text}<br>KL %{x:.2f}, gold %{y:.3f}<extra></extra>"))
    for p in points:
        if p["kind"] == "final":
            fig.add_trace(go.Scatter(x=[p["kl"]], y=[p["gold"]], mode="markers+text", name=p["policy"], text=[p["policy"]],
                                     textposition="top center", marker=dict(size=14, color=POLICY_COLORS.get(p["policy"])),
                                     hovertemplate=f"{p['policy']}, n={p['n']}<br>KL %{{x:.2f}}, gold %{{y:.3f}}<extra></extra>"))
    unmeasured = [p["policy"] for p in points if p["kind"] == "no_kl"]
    note = f" ({', '.join(unmeasured)}: no KL measured)" if unmeasured else ""
    fig.update_layout(height=420, title=f"Gold reward against KL to {reference}: where each policy landed{note}",
                      xaxis_title=f"KL(π ‖ π_{reference}) per response (nats, Monte-Carlo)", yaxis_title="mean gold reward")
    _fit_x_to_trained(fig, points)
    return fig


def _fit_x_to_trained(fig, points) -> None:
    """The base model sits far from the SFT reference (tens of nats) while the RL policies sit within a few:
    on one linear axis they would crowd against zero. When base is more than 3× further than the furthest
    other point, the axis shows the others; a triangle on its right edge, at base's gold, points off the
    chart, and a line under the axis, clear of the points and their labels, names base's KL and gold."""
    import plotly.graph_objects as go

    far = [p for p in points if p["policy"] == "base" and p["kind"] == "final" and p["kl"] is not None]
    near = [p["kl"] for p in points if p["policy"] != "base" and p["kl"] is not None]
    top = max(near, default=0.0)
    if not far or top <= 0 or far[0]["kl"] <= 3 * top:
        return
    base = far[0]
    fig.update_xaxes(range=[min(0.0, *near) - 0.05 * top, 1.25 * top])  # Monte-Carlo KLs can dip below 0
    fig.add_trace(go.Scatter(x=[1.25 * top], y=[base["gold"]], mode="markers", showlegend=False, cliponaxis=False,
                             marker=dict(symbol="triangle-right", size=12, color=POLICY_COLORS.get("base")),
                             hovertemplate=f"base, off the chart: KL {base['kl']:.1f}, gold {base['gold']:.3f}"
                                           "<extra></extra>"))
    fig.add_annotation(xref="paper", yref="paper", x=1, y=0, yshift=-48, xanchor="right", yanchor="top",
                       showarrow=False, text=f"▶ base, off the chart: KL {base['kl']:.1f}, gold {base['gold']:.3f}")


def gold_vs_proxy(series_by_stage):
    """Per online stage, gold (left axis) and proxy (right axis) reward of the training samples over
    steps, with the parting point (`evaluate.parting_point`) marked. `series_by_stage`: the output of
    `evaluate.gold_proxy_over_training`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    stages = list(series_by_stage)
    if not stages:
        fig = go.Figure()
        fig.add_annotation(text="No online RL stage (PPO, GRPO, RLOO) in this run yet: nothing to compare.",
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(height=200, title="Gold against proxy reward over training",
                          xaxis_visible=False, yaxis_visible=False)
        return fig
    from .evaluate import centred_mean, parting_outcome

    def title(stage):
        s = series_by_stage[stage]
        outcome = parting_outcome(s)
        return f"{stage}: parting at step {s['parting']['step']}" if outcome == "parted" else f"{stage}: {outcome}"

    fig = make_subplots(rows=1, cols=len(stages), subplot_titles=[title(s) for s in stages],
                        specs=[[{"secondary_y": True}] * len(stages)])
    for col, stage in enumerate(stages, start=1):
        s = series_by_stage[stage]
        window = min(s["trend"]["window"], len(s["step"]))
        for key, label, color, right in (("objective/gold", "gold", COLORS["optimum"], False),
                                         ("objective/scores", "proxy (reward model)", COLORS["reward"], True)):
            # each step's mean as a faint dot; the line is the moving average the parting rule reads
            fig.add_trace(go.Scatter(x=s["step"], y=s[key], name=f"{label}, per step", mode="markers",
                                     marker=dict(color=color, size=5, opacity=0.45), showlegend=col == 1),
                          row=1, col=col, secondary_y=right)
            fig.add_trace(go.Scatter(x=s["step"], y=centred_mean(s[key], window).tolist(),
                                     name=f"{label}, mean of {window} steps", mode="lines", line=dict(color=color),
                                     showlegend=col == 1), row=1, col=col, secondary_y=right)
        part = s.get("parting")
        if part:
            fig.add_vline(x=part["step"], line=dict(color="crimson", dash="dash"), row=1, col=col,
                          annotation_text=f"parting: step {part['step']}", annotation_position="top left")
        fig.update_xaxes(title_text="step", row=1, col=col)
        fig.update_yaxes(title_text="gold" if col == 1 else None, row=1, col=col, secondary_y=False)
        fig.update_yaxes(title_text="proxy (normalised)" if col == len(stages) else None, row=1, col=col,
                         secondary_y=True, tickmode="auto", nticks=6, showgrid=False)
    fig.update_layout(height=380, title="Gold beside proxy reward of the training samples, per step (each on its "
                                        "own axis: where the lines cross means nothing)")
    return fig


def stage_curves(curves, keys):
    """Every stage's training curves, side by side: one row per stage, one subplot per metric key, each on the
    stage's whole span of steps (so an evaluation logged once, at the end, sits at the end, its value written
    beside it). `curves`: {stage: metrics rows}; `keys`: {stage: [key, ...]} (see `evaluate.curve_keys`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    stages = [s for s in curves if keys.get(s)]
    if not stages:
        fig = go.Figure()
        fig.update_layout(height=200, title="No training curves in this run yet")
        return fig
    width = max(len(keys[s]) for s in stages)
    titles = [f"{s}: {keys[s][j]}" if j < len(keys[s]) else "" for s in stages for j in range(width)]
    fig = make_subplots(rows=len(stages), cols=width, subplot_titles=titles, vertical_spacing=0.5 / len(stages),
                        horizontal_spacing=0.3 / width)  # room for each subplot's axis title beside its neighbour
    for i, stage in enumerate(stages, start=1):
        steps = [r["step"] for r in curves[stage] if isinstance(r.get("step"), (int, float))]
        span = (min(steps), max(steps)) if steps else None
        for j, key in enumerate(keys[stage], start=1):
            pts = [(r["step"], r[key]) for r in curves[stage] if isinstance(r.get(key), (int, float))]
            one = len(pts) == 1
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts],
                                     mode="markers+text" if one else "lines+markers", marker=dict(size=8 if one else 4),
                                     text=[f"{pts[0][1]:.3g}"] if one else None, textposition="middle left",
                                     line=dict(color=POLICY_COLORS.get(stage)), name=f"{stage} {key}",
                                     showlegend=False), row=i, col=j)
            fig.update_yaxes(title_text=METRIC_UNITS.get(key), row=i, col=j)
            if span and span[1] > span[0]:
                pad = 0.04 * (span[1] - span[0])
                fig.update_xaxes(range=[span[0] - pad, span[1] + pad], row=i, col=j)
    fig.update_layout(height=60 + 230 * len(stages), title="Training curves of every stage (from metrics.jsonl)",
                      margin=dict(l=60, r=20, t=80, b=40))
    return fig


# --- notebook 05: DPO, GRPO and RLOO beside PPO -----------------------------------------------------------

def method_curves(rows_by_method, keys, samples_per_step, title="Training curves on shared axes"):
    """One subplot per metric key, one line per method, x = samples seen (step × samples per step), all
    subplots sharing that axis. `rows_by_method`: {method: metrics rows}; `samples_per_step`: {method: int}."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = [k for k in keys if any(k in r for rows in rows_by_method.values() for r in rows)]
    fig = make_subplots(rows=1, cols=max(1, len(keys)), subplot_titles=keys or ["(no data)"], shared_xaxes="all")
    for method, rows in rows_by_method.items():
        for col, key in enumerate(keys, start=1):
            pts = [(r["step"] * samples_per_step[method], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                         name=method, legendgroup=method, showlegend=col == 1, marker=dict(size=5),
                                         line=dict(color=POLICY_COLORS.get(method))), row=1, col=col)
            fig.update_xaxes(title_text="samples seen", row=1, col=col)
    fig.update_layout(height=360, title=title, margin=dict(l=40, r=20, t=70, b=40))
    return fig


def implicit_reward_scatter(rm_margin, dpo_margin, hover=None, x_title="reward-model margin (normalised)"):
    """One dot per held-out pair: the reward model's score margin chosen − rejected against DPO's implicit
    reward margin β·Δlog(π/π_ref). Upper-right and lower-left: both agree with the label or both disagree."""
    import plotly.graph_objects as go

    x, y = _np(rm_margin), _np(dpo_margin)
    fig = go.Figure(go.Scatter(x=x, y=y, mode="markers", text=hover, marker=dict(size=8, color=COLORS["dpo"], opacity=0.7),
                               hovertemplate="%{text}<br>RM %{x:.2f}, DPO %{y:.3f}<extra></extra>" if hover else None))
    fig.add_hline(y=0, line=dict(color="gray", dash="dot"))
    fig.add_vline(x=0, line=dict(color="gray", dash="dot"))
    fig.update_layout(height=380, width=480, title="Held-out pairs: DPO's implicit reward against the reward model",
                      xaxis_title=x_title, yaxis_title="DPO implicit reward margin")
    return fig


def cost_figure(table, reference="sft"):
    """Gold reward against training seconds per sample, one marker per method sized by the memory its stage
    added to what the process held; the reference's gold reward as a dotted line. Per sample, because the
    methods ran at different budgets (a DPO sample is one reply of a pair, scored, not sampled). `table`:
    rows of `comparison.comparison_table`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    ref = next((r for r in table if r["policy"] == reference), None)
    rows = [r for r in table if r["policy"] != reference and r.get("seconds_per_sample") is not None
            and r.get("gold") is not None]
    most = max((r.get("memory_added_mb") or 0 for r in rows), default=0) or 1
    for r in rows:
        added = r.get("memory_added_mb")
        fig.add_trace(go.Scatter(
            x=[r["seconds_per_sample"]], y=[r["gold"]], mode="markers+text", text=[r["policy"]],
            textposition="top center", name=r["policy"],
            marker=dict(size=12 + 28 * max(added or 0, 0) / most, color=POLICY_COLORS.get(r["policy"])),
            hovertemplate=f"{r['policy']}: %{{x:.1f}} s per sample, gold %{{y:.3f}}, "
                          + (f"{added:.0f} MB added" if added is not None else "memory not recorded")
                          + f", {r.get('samples_seen')} samples in {r.get('wall_time_s') or 0:.0f} s<extra></extra>"))
    if ref and ref.get("gold") is not None:
        fig.add_hline(y=ref["gold"], line=dict(color="gray", dash="dot"), annotation_text=reference)
    fig.update_layout(height=380, title="What each method bought, and its cost per training sample, at these budgets "
                                        "(marker size: memory the stage added)",
                      xaxis_title="training seconds per sample", yaxis_title="mean gold reward on held-out prompts")
    return fig
