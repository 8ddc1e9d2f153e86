"""Writers for the run's CSVs, run.json, and the per-run plot.

CSV files are rewritten whole from the run's history through a temporary file and a rename, so
a killed run never leaves half a row and a resumed run cannot duplicate rows.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Iterable, Optional

import pandas as pd

from .data import atomic_write_text

SCORE_COLUMNS = ("diff", "entropy", "bleu", "P", "R", "F1")
EPOCH_CSV_COLUMNS = ("id", "diff", "entropy", "bleu", "P", "R", "F1", "candidate", "reference")


def write_csv(path: str, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_epoch_csv(directory: str, epoch: int, per_sample: pd.DataFrame) -> None:
    """``epoch{E}.csv``: the reference's columns first, then ours (flag, ma, el_n, loss ...)."""
    extra = [c for c in per_sample.columns if c not in EPOCH_CSV_COLUMNS]
    write_csv(os.path.join(directory, f"epoch{epoch}.csv"), per_sample[list(EPOCH_CSV_COLUMNS) + extra])


def write_history_files(directory: str, history: list[dict], el_keys: list[str],
                        thresholds: dict[str, float]) -> None:
    """valid.csv and score.csv (the reference's), history.csv (every column) and metrics.png."""
    df = pd.DataFrame(history)
    write_csv(os.path.join(directory, "valid.csv"), df[["epoch", "val_loss", "acc", *el_keys]])
    write_csv(os.path.join(directory, "score.csv"), df[["epoch", *SCORE_COLUMNS]])
    write_csv(os.path.join(directory, "history.csv"), df)
    plot_history(history, thresholds, os.path.join(directory, "metrics.png"), el_key=el_keys[0])


def write_heldout_csv(directory: str, per_epoch: dict[int, list[float]]) -> None:
    """``heldout.csv``: one line per held-out row (its index in the --heldout array), one
    ``epoch{E}`` column per validation with that row's LM loss."""
    cols = {"row": range(len(next(iter(per_epoch.values()))))}
    cols.update({f"epoch{e}": per_epoch[e] for e in sorted(per_epoch)})
    write_csv(os.path.join(directory, "heldout.csv"), pd.DataFrame(cols))


def load_json(path: str) -> Any:
    """A JSON file written by :func:`write_json`; ValueError when it is not valid JSON."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers (for run.json)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "bert_score", "numpy", "nltk"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:  # not installed (deepspeed on a plain box) is fine
            continue
    from . import __version__

    out["icu"] = __version__
    return out


def plot_history(history: list[dict], thresholds: dict[str, float], path: str, el_key: str = "el_10") -> None:
    """One PNG: MA, EL, mean BLEU / F1, and samples still flagged, per epoch, thresholds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [
        (axes[0][0], "acc", "memorization accuracy (MA)", thresholds.get("acc")),
        (axes[0][1], el_key, f"extraction likelihood ({el_key.upper().replace('_', '')})", thresholds.get("el")),
        (axes[1][0], None, "generation check (means)", None),
        (axes[1][1], "flagged", "samples still flagged", None),
    ]
    for ax, key, title, thr in panels:
        if key is None:
            ax.plot(epochs, [h.get("bleu", float("nan")) for h in history], marker="o", label="BLEU")
            ax.plot(epochs, [h.get("F1", float("nan")) for h in history], marker="o", label="BERTScore F1")
            if thresholds.get("bleu") is not None:
                ax.axhline(thresholds["bleu"], ls="--", color="C0", alpha=0.6, label="BLEU threshold")
            if thresholds.get("f1") is not None:
                ax.axhline(thresholds["f1"], ls="--", color="C1", alpha=0.6, label="F1 threshold")
            ax.legend(fontsize=8)
        else:
            ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o")
            if thr is not None:
                ax.axhline(thr, ls="--", color="red", alpha=0.7, label=f"threshold {thr}")
                ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Lay out, write ``fig`` to ``path`` through a temporary file and a rename (a killed run
    never leaves half a PNG), and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
