"""Speed of the real-model world on this machine: one training step of each compared method (fp32
and bf16 autocast), one validation pass over the forget set, and the whole comparison; with the
peak memory of each.

    python bench/bench_real.py                          # steps + validation (~3 min on 2 cores)
    python bench/bench_real.py --compare                # also runs scripts/compare_real.sh, timed
    python bench/bench_real.py --summary_only           # the timings of a finished comparison
    python bench/bench_real.py --epoch_only --unlearned M  # seconds per epoch, --el_when always vs needed
    python bench/bench_real.py --from_runs result/compare_real # the same, read off a study's runs

Needs the world (`python -m icu.realworld`, see README "Real model"); the comparison needs what
scripts/compare_real.sh needs. Prints a table and one JSON line; say the machine's load (printed)
with the numbers, since torch on 2 cores slows down several-fold beside another busy process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch

STEP_METHODS = {"ga": {"uw": 1.0}, "npo": {"beta": 0.1}, "kl": {"uw": 1.0, "kl": 1.0}, "po": {"lw": 1.0},
                "icu": {"uw": 1.0, "lw": 0.5, "kl": 1.0}}  # config/compare_real.yaml's weights


def peak_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def pairs(real: str, batch_size: int):
    from icu.data import PairedDataset, encode_rows, load_experiment
    from icu.models import BUILTIN_GPT2, load_tokenizer

    gpt2, tok = load_tokenizer(BUILTIN_GPT2), load_tokenizer(os.path.join(real, "memorized"))
    exp = "test" if os.path.isdir(os.path.join(real, "exp", "test")) else "exp0"  # the study's reported targets
    u, uid, l, lid = load_experiment(os.path.join(real, "exp"), exp)
    data = PairedDataset(encode_rows(u, uid, gpt2, tok), encode_rows(l, lid, gpt2, tok))
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=batch_size)))
    return batch, data, gpt2, tok


def time_steps(real: str, batch_size: int, repeats: int) -> list[dict]:
    """Seconds of one optimizer step (forwards, backward, Adam) per method and precision."""
    from types import SimpleNamespace

    from icu.methods import StepBatch, get_method
    from icu.models import load_model

    batch, _, _, _ = pairs(real, batch_size)
    model = load_model(os.path.join(real, "memorized"))
    ref = load_model(os.path.join(real, "memorized")).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-12)  # a real step that changes ~nothing
    out = []
    for name, hp in STEP_METHODS.items():
        method = get_method(name)
        cfg = SimpleNamespace(**{"uw": 0.0, "lw": 0.0, "kl": 0.0, "beta": 0.1, "gamma": 0.0, **hp})
        for autocast in (False, True):
            times = []
            for _ in range(repeats):
                model.train()
                t0 = time.perf_counter()
                b = StepBatch(batch, lambda i, m: model(input_ids=i, attention_mask=m).logits,
                              learn_allowed=method.needs_learn(cfg),
                              reference=lambda i, m: ref(input_ids=i, attention_mask=m).logits,
                              reference_learn_probs=lambda: torch.softmax(ref(
                                  input_ids=batch["learn_input_ids"],
                                  attention_mask=batch["learn_attention_mask"]).logits.float(), -1))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss, _ = method.loss(b, cfg)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            out.append({"what": f"train step {name} ({'bf16 autocast' if autocast else 'fp32'})",
                        "seconds": round(min(times), 2), "batch": batch_size})
            print(f"  {out[-1]['what']}: {out[-1]['seconds']} s", flush=True)
    return out


def time_validation(real: str, batch_size: int, model_dir: str, label: str, el_ns=(10,)) -> dict:
    """One validation pass (generation check, BERTScore, MA, and EL10 unless ``el_ns`` is empty:
    --el_when needed at a validation that cannot stop the run) over the forget set."""
    from icu.forget_eval import evaluate_forget_set
    from icu.metrics import get_bertscorer
    from icu.models import BUILTIN_MINILM, load_model

    _, data, gpt2, tok = pairs(real, batch_size)
    model = load_model(model_dir)
    scorer = get_bertscorer(BUILTIN_MINILM)
    t0 = time.perf_counter()
    res = evaluate_forget_set(model, tok, gpt2, data.unlearn, scorer=scorer, batch_size=batch_size, progress=False,
                              el_ns=el_ns)
    seconds = time.perf_counter() - t0
    row = {"what": f"validation pass, {len(data)} targets, {label}{'' if el_ns else ', no EL'}",
           "seconds": round(seconds, 1), "ma": round(res.ma, 4), "el_10": round(res.el[10], 4) if el_ns else None,
           "phases": {k: round(v, 1) for k, v in res.seconds.items()}}
    print(f"  {row['what']}: {row['seconds']} s {row['phases']}", flush=True)
    return row


def time_heldout(real: str, batch_size: int, rows: int) -> dict:
    """The held-out pass of every validation (--heldout): seconds for ``rows`` rows."""
    import numpy as np

    from icu.heldout import encode_heldout, heldout_row_losses
    from icu.models import BUILTIN_GPT2, load_model, load_tokenizer

    model_dir = os.path.join(real, "memorized")
    held = np.load(os.path.join(real, "heldout.npy"))[:rows]
    enc = encode_heldout(held, load_tokenizer(BUILTIN_GPT2), load_tokenizer(model_dir))
    model = load_model(model_dir)
    t0 = time.perf_counter()
    heldout_row_losses(model, enc, range(len(held)), batch_size)
    row = {"what": f"held-out pass, {len(held)} rows", "seconds": round(time.perf_counter() - t0, 1)}
    print(f"  {row['what']}: {row['seconds']} s", flush=True)
    return row


def epoch_table(result: dict, steps_per_epoch: int, step_key: str) -> None:
    """Seconds per epoch of one method under --el_when always and needed (a validation that
    cannot stop the run), from the timed parts."""
    step = next(s["seconds"] for s in result["steps"] if s["what"] == step_key)
    held = result["heldout"]["seconds"]
    for v_always, v_needed in zip(result["validation"][0::2], result["validation"][1::2]):
        always = steps_per_epoch * step + v_always["seconds"] + held
        needed = steps_per_epoch * step + v_needed["seconds"] + held
        print(f"  epoch ({steps_per_epoch} x {step_key}, {v_always['what']}, + held-out): always {always:.0f} s, "
              f"needed {needed:.0f} s ({100 * (1 - needed / always):.0f}% less)", flush=True)


def runs_epoch_summary(root: str) -> dict:
    """Seconds per epoch of every finished trainer run under ``root`` (its history.csv): training,
    validations that skipped EL (--el_when needed) and validations that decoded it."""
    import pandas as pd

    frames = []
    for path in glob.glob(os.path.join(glob.escape(root), "**", "train", "history.csv"), recursive=True):
        df = pd.read_csv(path)
        if "el_skipped" in df:
            df["method"] = os.path.basename(os.path.dirname(os.path.dirname(path)))
            df["method"] = df["method"].where(~df["method"].str.startswith("lr"), path.split(os.sep)[-4])
            frames.append(df)
    if not frames:
        sys.exit(f"error: no trainer history.csv with el_skipped under {root}")
    df = pd.concat(frames)
    out = {"runs": len(frames), "validations": len(df)}
    for name, sub in (("validation_el_skipped", df[df["el_skipped"]]), ("validation_el_decoded", df[~df["el_skipped"]])):
        out[name] = {"n": len(sub), "mean_seconds": round(float(sub["seconds_valid"].mean()), 1)}
    train = df[df["epoch"] > 0].groupby("method")["seconds_train"].mean().round(1).to_dict()
    out["train_seconds_per_epoch"] = train
    for m, t in train.items():
        skip, dec = out["validation_el_skipped"]["mean_seconds"], out["validation_el_decoded"]["mean_seconds"]
        print(f"  {m}: epoch = train {t} s + validation: EL skipped {skip} s (needed) / EL decoded {dec} s "
              f"(always; includes the extra forward of needed's EL pass) -> {t + skip:.0f} s vs {t + dec:.0f} s", flush=True)
    print(f"  ({out['runs']} runs, {out['validations']} validations; "
          f"{out['validation_el_skipped']['n']} skipped EL, {out['validation_el_decoded']['n']} decoded it)")
    return out


def comparison_summary(out_dir: str) -> dict:
    """Per-method seconds of a comparison folder: the trainer's own time and each step's span."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*", "row.json"))):
        with open(path, encoding="utf-8") as fh:
            row = json.load(fh)
        rows[row["method"]] = {"epochs": row.get("epochs"), "train_seconds": row.get("seconds")}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", default=os.path.join(REPO, "datasets", "real_n32"), help="python -m icu.realworld --out")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="steps timed per method (the fastest counts)")
    p.add_argument("--compare", action="store_true", help="also run scripts/compare_real.sh and time it")
    p.add_argument("--compare_dir", default=os.path.join(REPO, "result", "compare_real"))
    p.add_argument("--unlearned", default=None, help="also time validation on this (unlearned) model folder")
    p.add_argument("--summary_only", action="store_true", help="only summarize --compare_dir")
    p.add_argument("--epoch_only", action="store_true",
                   help="only the parts of an epoch: steps at --batch_size, validation with and without EL, "
                        "the held-out pass; prints seconds per epoch under --el_when always and needed")
    p.add_argument("--from_runs", default=None,
                   help="only read the trainer runs under this folder (a study's --dir): seconds per epoch "
                        "with EL skipped and decoded")
    p.add_argument("--heldout_rows", type=int, default=64, help="held-out rows of the timed held-out pass")
    p.add_argument("--steps_per_epoch", type=int, default=8, help="optimizer steps per epoch (16 targets, batch 2)")
    args = p.parse_args()
    if args.from_runs:
        print(json.dumps(runs_epoch_summary(args.from_runs)))
        return
    if not os.path.isfile(os.path.join(args.real, "real.json")):
        sys.exit(f"error: no real-model world in {args.real}; build it with `python -m icu.realworld` (README, Real model)")
    torch.set_grad_enabled(True)
    print(f"load average before: {os.getloadavg()}, torch threads {torch.get_num_threads()}", flush=True)
    result: dict = {"load_before": os.getloadavg(), "threads": torch.get_num_threads()}
    if args.epoch_only:
        result["steps"] = time_steps(args.real, args.batch_size, args.repeats)
        with torch.no_grad():
            result["validation"] = []
            for label, model_dir in (("memorizing model", os.path.join(args.real, "memorized")),
                                     ("unlearned model", args.unlearned)):
                if model_dir:
                    for el_ns in ((10,), ()):
                        result["validation"].append(time_validation(args.real, 8, model_dir, label, el_ns))
            result["heldout"] = time_heldout(args.real, 8, args.heldout_rows)
        for name in ("ga", "icu"):
            epoch_table(result, args.steps_per_epoch, f"train step {name} (bf16 autocast)")
    elif not args.summary_only:
        result["steps"] = time_steps(args.real, args.batch_size, args.repeats)
        with torch.no_grad():
            result["validation"] = [time_validation(args.real, args.batch_size, os.path.join(args.real, "memorized"),
                                                    "memorizing model")]
            if args.unlearned:
                result["validation"].append(time_validation(args.real, args.batch_size, args.unlearned, "unlearned model"))
        result["peak_mib_steps_and_validation"] = round(peak_mib(), 0)
    if args.compare:
        t0 = time.perf_counter()
        rc = subprocess.call(["bash", os.path.join(REPO, "scripts", "compare_real.sh")],
                             env={**os.environ, "ICU_COMPARE_DIR": args.compare_dir})
        result["compare"] = {"exit": rc, "wall_seconds": round(time.perf_counter() - t0, 1),
                             "peak_mib_largest_step": round(peak_mib(resource.RUSAGE_CHILDREN), 0)}
    if os.path.isdir(args.compare_dir):
        result["compare_methods"] = comparison_summary(args.compare_dir)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
