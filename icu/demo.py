"""The demo's closing table: forget-set metrics before/after ICU and held-out loss on the toy.

    python -m icu.demo --toy datasets/toy --before result/demo/before --after result/demo/after \
        --run result/demo/train

Reads eval.py's ``eval.csv`` of the original and the unlearned model, the trainer's
``run.json`` (for the unlearned model's folder and the stop reason), and measures the LM loss of
both models on toy rows they never saw (the "general ability" check of the toy world).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import numpy as np
import pandas as pd

from .data import load_train_array
from .console import setup_console
from .errors import IcuError, exit_on_user_error
from .heldout import mean_lm_loss


def _eval_row(directory: str) -> pd.Series:
    path = os.path.join(directory, "eval.csv")
    if not os.path.isfile(path):
        raise IcuError(f"{path} not found; run eval.py with --dir {directory} first")
    return pd.read_csv(path).iloc[0]


def threshold_table(run: dict) -> pd.DataFrame:
    """The stop / flag thresholds a run used and where each came from (run.json)."""
    rec = run.get("thresholds") or {}
    args = run["args"]
    rules = {"acc": "stop: MA <=", "el": "stop: EL <=", "el_start": "EL from prefix",
             "f1": "flag: F1 >=", "bleu": "flag: BLEU >="}
    values, source = rec.get("values", {}), rec.get("source", {})
    shown = [values.get(k, args.get(k)) for k in rules]
    return pd.DataFrame({
        "rule": list(rules.values()),
        "value": [f"{v:.4f}" if isinstance(v, float) else str(v) for v in shown],
        "from": [source.get(k, "command line or default") for k in rules],
    })


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Print the demo's before/after table.")
    p.add_argument("--toy", default="datasets/toy")
    p.add_argument("--before", required=True, help="eval.py --dir of the original model")
    p.add_argument("--after", required=True, help="eval.py --dir of the unlearned model")
    p.add_argument("--run", required=True, help="the trainer's --dir")
    p.add_argument("--heldout_rows", type=int, default=256)
    args = p.parse_args(argv)
    setup_console()

    with open(os.path.join(args.run, "run.json"), encoding="utf-8") as fh:
        run = json.load(fh)
    before, after = _eval_row(args.before), _eval_row(args.after)
    rows = load_train_array(os.path.join(args.toy, "train_dataset.npy"))
    heldout = np.load(os.path.join(args.toy, "heldout_ids.npy"))[: args.heldout_rows]
    loss_before = mean_lm_loss(os.path.join(args.toy, "model"), rows[heldout])
    loss_after = mean_lm_loss(run["model_dir"], rows[heldout])

    table = pd.DataFrame(
        {
            "original": [before["ma"], before["el_10"], before["bleu"], before["F1"], loss_before],
            "after ICU": [after["ma"], after["el_10"], after["bleu"], after["F1"], loss_after],
        },
        index=["MA (forget set)", "EL10 (forget set)", "BLEU (forget set)", "BERTScore F1 (forget set)",
               f"LM loss ({len(heldout)} held-out rows)"],
    )
    table["change"] = table["after ICU"] - table["original"]
    pd.set_option("display.float_format", lambda v: f"{v:.4f}")
    print()
    print(f"ICU stopped after epoch {run['epochs']}: {run['stop_reason']}")
    print(table.to_string())
    print("\nthresholds the run used:")
    print(threshold_table(run).to_string(index=False))
    flagged = run.get("final", {}).get("flagged")
    if flagged is not None:
        print(f"targets still flagged at the end: {flagged} of {run.get('num_samples', '?')}")
    rise = 100.0 * (loss_after - loss_before) / loss_before
    acc, el = run["args"]["acc"], run["args"]["el"]
    print(
        f"\nforget set: MA {after['ma']:.4f} ({'<=' if after['ma'] <= acc else '>'} {acc:.4f}), "
        f"EL10 {after['el_10']:.4f} ({'<=' if after['el_10'] <= el else '>'} {el:.4f}); "
        f"held-out loss {rise:+.1f}%"
    )
    table.to_csv(os.path.join(args.run, "demo_table.csv"))


if __name__ == "__main__":
    main()
