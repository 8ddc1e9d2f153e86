"""compare.py's outputs from the methods' rows: comparison.csv / .md (one row per method: the
run's numbers, or over several runs their mean and 95% CI), runs.csv (one row per run and
method), trajectories.csv (every validation), differences.csv / .md (paired against each --baseline),
tradeoff.png (forgetting against general ability along each run) and results.json (for
evaluation/)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from ..data import atomic_write_text
from ..errors import disk_errors
from ..report import save_figure

logger = logging.getLogger("icu")

FORGET_COLUMNS = ("bleu", "F1", "val_loss")
MIA_COLUMNS = ("auc_loss", "auc_zlib", "auc_min_k", "auc_min_k_pp")
# the columns a multi-run table summarizes as mean ± CI (plus the EL and task columns)
SUMMARY_COLUMNS = ("epochs", "seconds", "ma", "bleu", "F1", "val_loss", "heldout_loss", "heldout_at_threshold",
                   "epoch_at_threshold", "ma_overshoot", *MIA_COLUMNS)
# the paired differences against the baseline
# the perplexities pair too where --every_run_tasks scored them on every run
DIFF_COLUMNS = ("heldout_at_threshold", "heldout_loss", "ma", "auc_min_k_pp", "epochs", "wikitext", "pile")


def el_keys(el_n: str) -> list[str]:
    return [f"el_{n.strip()}" for n in str(el_n).split(",") if n.strip()]


def downstream_mean(values: dict[str, Any], tasks: Sequence[str]) -> Optional[float]:
    """Mean of the scored tasks' accuracies/F1s; perplexities (wikitext, pile) are on another
    scale and stay out of it."""
    from ..downstream import TASKS
    from ..downstream.tasks import PERPLEXITY

    scores = [_num(values.get(t)) for t in tasks if TASKS[t].family != PERPLEXITY]
    scores = [s for s in scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def _num(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def flat_row(row: dict, tasks: Sequence[str], els: Sequence[str], thresholds: dict[str, float]) -> dict:
    """One method's table row from its row.json content."""
    ev = row.get("eval") or {}
    out: dict[str, Any] = {"method": row["method"], "exp": row.get("exp"), "seed": row.get("seed"),
                           "lr": _num(row.get("lr")), "epochs": row.get("epochs"), "seconds": row.get("seconds"),
                           "ma": _num(ev.get("ma"))}
    out.update({k: _num(ev.get(k)) for k in els})
    out.update({k: _num(ev.get(k)) for k in FORGET_COLUMNS})
    out["heldout_loss"] = _num((row.get("heldout") or {}).get("loss"))
    out["heldout_se"] = _num((row.get("heldout") or {}).get("se"))
    at = row.get("at_threshold") or {}
    out["heldout_at_threshold"] = _num(at.get("loss"))
    out["epoch_at_threshold"] = _num(at.get("epoch"))
    # how far the stop point went past the MA threshold (> 0: forgot more than asked)
    out["ma_overshoot"] = thresholds["acc"] - out["ma"] if out["ma"] is not None and row["method"] != "original" else None
    mia = row.get("membership") or {}
    out.update({k: _num(mia.get(k)) for k in MIA_COLUMNS})
    values = (row.get("tasks") or {}).get("values") or {}
    out.update({t: _num(values.get(t)) for t in tasks})
    if tasks:
        out["downstream_mean"] = downstream_mean(values, tasks)
    forgot = None
    if out["ma"] is not None and all(out[k] is not None for k in els):
        # the stop rule's "at most" (icu.loop.stop_reason)
        forgot = out["ma"] <= thresholds["acc"] and min(out[k] for k in els) <= thresholds["el"]
    out["under_thresholds"] = forgot
    out["stop_reason"] = row.get("failed") or row.get("stop_reason")
    out["model_dir"] = row.get("model_dir")
    return out


def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column == "seconds" else f"{value:.4f}"
    return str(value).replace("|", "/")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-style table of ``df`` (floats to 4 decimals, seconds to 1)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_cell(r[c], c) for c in cols) + " |")
    return "\n".join(lines)


def _label_offset(xy: np.ndarray, i: int) -> tuple[int, int, str]:
    """Where point ``i``'s label goes (offset in points, alignment): with k earlier points within
    10% of the data's span of it, the k-th level of a stack that alternates above and below, so
    labels of points that (nearly) coincide land at different heights."""
    span = np.ptp(xy, axis=0)
    span[span == 0] = 1.0
    k = int((np.abs(xy[:i] - xy[i]) / span < 0.10).all(axis=1).sum())
    level = k // 2 + 1
    return 5, (5 + 11 * (level - 1)) if k % 2 == 0 else -(2 + 11 * level), "left"


def plot_tradeoff(df: pd.DataFrame, els: Sequence[str], thresholds: dict[str, float], path: str) -> None:
    """Forget-set EL and MA (y, lower = more forgotten) against general ability (x: held-out
    loss, else the downstream mean), one labelled point per method, the stop thresholds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df["heldout_loss"].notna().any():
        x_col, x_label = "heldout_loss", "held-out LM loss (lower = more general ability kept)"
    elif "downstream_mean" in df and df["downstream_mean"].notna().any():
        x_col, x_label = "downstream_mean", "downstream mean (higher = more general ability kept)"
    else:
        x_col, x_label = "val_loss", "forget-set loss (no --heldout or --tasks given)"
    el = els[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, y_col, thr, title in ((axes[0], el, thresholds["el"], el.upper().replace("_", "")),
                                  (axes[1], "ma", thresholds["acc"], "MA")):
        sub = df[df[x_col].notna() & df[y_col].notna()]
        xy = sub[[x_col, y_col]].to_numpy(float)
        for i, (_, r) in enumerate(sub.iterrows()):
            ax.scatter([r[x_col]], [r[y_col]], color=method_colour(r["method"]))
            dx, dy, ha = _label_offset(xy, i)
            ax.annotate(r["method"], (r[x_col], r[y_col]), textcoords="offset points",
                        xytext=(dx, dy), ha=ha, fontsize=9)
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
        ax.axhline(thr, ls="--", color="red", alpha=0.7, label=f"stop threshold {thr:.4g}")
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(f"forget-set {title} (lower = more forgotten)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("forgetting vs general ability, one point per method", fontsize=11)
    save_figure(fig, path)


def write_results_json(out_dir: str, policies: Sequence[tuple[str, str]]) -> None:
    """Every evaluated method as a policy of evaluation/'s results.json (evaluation.convert);
    ``policies``: (name, its eval unlearn.csv)."""
    from evaluation.convert import InputError, convert, write_json_atomic

    policies = [(m, p) for m, p in policies if os.path.isfile(p)]
    if not policies:
        return
    try:
        write_json_atomic(convert(policies), os.path.join(out_dir, "results.json"))
    except InputError as exc:
        logger.warning("results.json not written: %s", exc)


def trajectories(rows: Sequence[dict]) -> pd.DataFrame:
    """Every validation of every run: method, exp, seed, epoch, MA, EL, held-out loss and SE."""
    recs = [{"method": r["method"], "exp": r.get("exp"), "seed": r.get("seed"), **p}
            for r in rows for p in (r.get("trajectory") or [])]
    return pd.DataFrame(recs)


def summarize_runs(df: pd.DataFrame, columns: Sequence[str], methods: Sequence[str]) -> pd.DataFrame:
    """Per method: the number of runs, then each column's mean and 95% CI half-width (t) over runs."""
    from .stats import t_interval

    out = []
    for m in methods:
        sub = df[df["method"] == m]
        rec: dict[str, Any] = {"method": m, "runs": len(sub)}
        if "under_thresholds" in sub:
            vals = [v for v in sub["under_thresholds"] if v is not None and not (isinstance(v, float) and math.isnan(v))]
            rec["reached_thresholds"] = f"{sum(bool(v) for v in vals)}/{len(sub)}"
        for c in columns:
            ci = t_interval(pd.to_numeric(sub[c], errors="coerce").tolist())
            rec[c], rec[f"{c}_ci"] = ci["mean"], ci["half"]
        out.append(rec)
    return pd.DataFrame(out)


def paired_table(df: pd.DataFrame, baseline: str, methods: Sequence[str]) -> pd.DataFrame:
    """method − baseline run by run, mean and 95% CI over runs, for DIFF_COLUMNS. Runs pair on
    (split, seed); the untrained model (seed None, one run per split) pairs on the split."""
    from .stats import paired_differences

    def values(m: str, col: str) -> dict:
        sub = df[df["method"] == m]
        return {(r["exp"], None if pd.isna(r["seed"]) else int(r["seed"])): _num(r[col]) for _, r in sub.iterrows()}

    out = []
    for m in methods:
        if m == baseline:
            continue
        for col in (c for c in DIFF_COLUMNS if c in df):
            a, b = values(m, col), values(baseline, col)
            keys = sorted(set(a) | set(b), key=str)
            pick = lambda d, k: d.get(k, d.get((k[0], None)))  # a per-split value stands for every seed
            keys = [k for k in keys if k[1] is not None] or keys
            pa = {k: pick(a, k) for k in keys}
            pb = {k: pick(b, k) for k in keys}
            d = paired_differences({k: v for k, v in pa.items() if v is not None},
                                   {k: v for k, v in pb.items() if v is not None})
            out.append({"method": m, "baseline": baseline, "column": col, "diff": d["mean"], "ci": d["half"],
                        "runs": d["n"], "ci_excludes_zero": d["excludes_zero"]})
    return pd.DataFrame(out)


# one colour per method in every figure, whatever methods a comparison holds
_PALETTE = {m: f"C{i}" for i, m in enumerate(("ga", "npo", "kl", "po", "icu", "llmu", "simnpo"))}


def method_colour(method: str) -> str:
    return _PALETTE.get(method) or f"C{7 + sum(map(ord, method)) % 3}"


def plot_trajectories(traj: pd.DataFrame, flat: pd.DataFrame, thresholds: dict[str, float], path: str) -> None:
    """Forget-set MA (x) against held-out loss (y) along every run, one colour per method (a
    thin line per run, its stop point marked), the MA stop threshold as a vertical line; the
    untrained model as a star. Lower-left is better: forgotten, ability kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m in dict.fromkeys(traj["method"]):
        sub = traj[traj["method"] == m]
        colour = method_colour(m)
        first = True
        for _, run in sub.groupby(["exp", "seed"], dropna=False, sort=False):
            run = run.sort_values("epoch")
            if m == "original":
                ax.scatter(run["acc"], run["heldout_loss"], marker="*", s=160, color="black",
                           label="original" if first else None, zorder=3)
            else:
                ax.plot(run["acc"], run["heldout_loss"], color=colour, alpha=0.75, lw=1.2, marker=".",
                        label=m if first else None)
                ax.scatter(run["acc"].iloc[-1:], run["heldout_loss"].iloc[-1:], color=colour, s=40, zorder=3)
            first = False
    ax.axvline(thresholds["acc"], ls="--", color="red", alpha=0.7, label=f"MA stop threshold {thresholds['acc']:.4g}")
    ax.set_xlabel("forget-set memorization accuracy (MA; lower = more forgotten)", fontsize=9)
    ax.set_ylabel("held-out LM loss (lower = more general ability kept)", fontsize=9)
    ax.invert_xaxis()  # training moves left to right: from memorized towards forgotten
    n_runs = flat.groupby("method").size().max() if len(flat) else 0
    ax.set_title(f"trajectories: one line per run ({n_runs} per method), dot = stop point", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(out_dir: str, rows: Sequence[dict], tasks: Sequence[str], el_n: str,
                 thresholds: dict[str, float], baselines: Sequence[str] = (), multi: bool = False,
                 eval_paths: Optional[Sequence[tuple[str, str]]] = None) -> str:
    """Write the outputs for ``rows`` (one per run and method); returns the markdown table."""
    els = el_keys(el_n)
    df = pd.DataFrame([flat_row(r, tasks, els, thresholds) for r in rows])
    # the untrained model is listed once per split, however many seeds
    df = df.drop_duplicates(subset=["method", "exp", "seed"], keep="last").reset_index(drop=True)
    uniq = {(r["method"], r.get("exp"), r.get("seed")): r for r in rows}
    traj = trajectories(list(uniq.values()))
    has_traj = len(traj) and "heldout_loss" in traj and traj["heldout_loss"].notna().any()
    methods = list(dict.fromkeys(df["method"]))
    note = (f"\n\nThresholds: MA <= {thresholds['acc']:.4g}, {els[0].upper().replace('_', '')} <= "
            f"{thresholds['el']:.4g}. heldout_at_threshold: held-out loss where the run's MA crossed the "
            "MA threshold (interpolated between validations); ma_overshoot: threshold − MA at the stop.\n")
    if multi:
        numeric = [c for c in (*SUMMARY_COLUMNS[:3], *els, *SUMMARY_COLUMNS[3:], *tasks,
                               *(["downstream_mean"] if tasks else [])) if c in df and df[c].notna().any()]
        summary = summarize_runs(df, numeric, methods)
        shown = ["method", "runs", "reached_thresholds"] + numeric
        md = summary[["method", "runs", "reached_thresholds"]].copy()
        for c in numeric:
            md[c] = [_interval_cell(a, b) for a, b in zip(summary[c], summary[f"{c}_ci"])]
        table = markdown_table(md[shown])
        note += (f"\nEach cell: mean ± half-width of the 95% t confidence interval over the runs "
                 f"({df.groupby('method').size().to_dict()} runs per method; the untrained model has one "
                 "run per split).\n")
    else:
        summary = df
        md_cols = [c for c in df.columns if c not in ("model_dir", "under_thresholds", "exp", "seed")
                   and (c in ("method", "stop_reason", "epochs", "seconds") or df[c].notna().any())]
        table = markdown_table(df[md_cols])
    with disk_errors(out_dir):
        atomic_write_text(os.path.join(out_dir, "comparison.csv"), summary.to_csv(index=False))
        atomic_write_text(os.path.join(out_dir, "comparison.md"), table + note)
        atomic_write_text(os.path.join(out_dir, "runs.csv"), df.to_csv(index=False))
        if len(traj):
            atomic_write_text(os.path.join(out_dir, "trajectories.csv"), traj.to_csv(index=False))
        bases = [b for b in baselines if b in methods]
        if bases and len(methods) > 1:
            diff = pd.concat([paired_table(df, b, methods) for b in bases], ignore_index=True)
            atomic_write_text(os.path.join(out_dir, "differences.csv"), diff.to_csv(index=False))
            atomic_write_text(os.path.join(out_dir, "differences.md"), differences_markdown(diff))
        if has_traj:
            plot_trajectories(traj, df, thresholds, os.path.join(out_dir, "tradeoff.png"))
        else:
            plot_tradeoff(df, els, thresholds, os.path.join(out_dir, "tradeoff.png"))
        write_results_json(out_dir, eval_paths if eval_paths is not None else
                           [(m, os.path.join(out_dir, m, "eval", "unlearn.csv")) for m in methods])
    return table


def _interval_cell(mean: Any, half: Any) -> str:
    from .stats import format_interval

    return format_interval(_num(mean), _num(half), digits=4)


def differences_markdown(diff: pd.DataFrame) -> str:
    """One line per method and column: "icu − ga, heldout_at_threshold: x ± y (n runs)"."""
    from .stats import format_interval

    lines = ["| difference | column | mean ± 95% CI | runs | CI excludes 0 |", "|---|---|---|---|---|"]
    for _, r in diff.iterrows():
        lines.append(f"| {r['method']} − {r['baseline']} | {r['column']} | "
                     f"{format_interval(_num(r['diff']), _num(r['ci']), 4)} | {r['runs']} | "
                     f"{'yes' if r['ci_excludes_zero'] else 'no'} |")
    return "\n".join(lines) + "\n\nPaired by run (split and seed); 95% t interval over the runs.\n"


def plot_tuning(grid: pd.DataFrame, path: str) -> None:
    """The lr grid: held-out loss at equal forgetting against lr, one line per method (log x);
    hollow markers: runs that did not meet the stop rule (their score is then missing or from
    a run that crossed the MA threshold without EL following), the chosen lr ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid.assign(score=pd.to_numeric(grid["score"], errors="coerce"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not grid["score"].notna().any():  # no grid run crossed the MA threshold: nothing to place
        ax.text(0.5, 0.5, "no grid run reached the MA threshold", ha="center", transform=ax.transAxes)
    for m, sub in grid.groupby("method", sort=False):
        sub = sub.sort_values("lr")
        colour = method_colour(m)
        ax.plot(sub["lr"], sub["score"], color=colour, marker="o", label=m)
        miss = sub[~sub["reached"].astype(bool)]
        ax.scatter(miss["lr"], miss["score"], facecolors="white", edgecolors=colour, zorder=3)
        chosen = sub[sub["chosen"].astype(bool)]
        ax.scatter(chosen["lr"], chosen["score"], s=160, facecolors="none", edgecolors=colour, zorder=3)
    if grid["score"].notna().any():
        ax.set_xscale("log")
    unplaced = grid[grid["score"].isna()]  # never crossed the MA threshold: no point to draw
    if len(unplaced):
        names = "; ".join(f"{m} {', '.join(f'{lr:g}' for lr in sub['lr'])}" for m, sub in unplaced.groupby("method", sort=False))
        ax.text(0.01, 0.01, f"never reached the MA threshold: {names}", transform=ax.transAxes, fontsize=7,
                va="bottom", ha="left")
    ax.set_xlabel("learning rate", fontsize=9)
    ax.set_ylabel("held-out loss at equal forgetting (tuning rows)", fontsize=9)
    ax.set_title("lr grid on the tuning targets (ringed: chosen)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
