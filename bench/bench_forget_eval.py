"""Time the forget-set metrics: the reference algorithm against icu.forget_eval.

For each model it runs, on the same samples:

* MA    - reference: one ``generate(max_new_tokens=1)`` per prefix length 1..T-1 and batch;
          fast: one teacher-forced pass per batch.
* EL_n  - reference: one greedy ``generate`` per prefix 150..T-1 and batch, tuple n-grams;
          fast: the teacher-forced pass, then only the prefixes where the model leaves the text
          are decoded (batched, from the true sequence's key/value cache).
* whole - the full validation pass (generation check with BLEU/BERTScore/diff/entropy, loss, MA,
          EL): reference = the reference's loops with ``bert_score.score`` reloading its model
          every batch; fast = ``evaluate_forget_set`` with a scorer loaded once per process
          (its one-time load is printed apart).

and prints a table with the times, the speed-up and the largest difference between the two
implementations' per-sample values. Models:

* ``toy``     - the offline toy GPT-Neo that memorized its 32 targets (built by icu.toy when
                absent: minutes), on those targets;
* ``random``  - a tiny random GPT-Neo (memorized nothing), on the same texts;
* ``neo125m`` - a random model shaped like EleutherAI/gpt-neo-125m (for a GPU), on the toy
                targets when the toy world exists, else on random GPT-2 id rows.

    python bench/bench_forget_eval.py                          # toy + random, CPU
    python bench/bench_forget_eval.py --model neo125m --device cuda --dtype bf16 \\
        --batch_size 8 --num_samples 32 --out bench_neo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from icu.data import encode_rows  # noqa: E402
from fast_paths import memorization_and_extraction  # noqa: E402  (tests/)
from icu.decoding.continuations import GreedyStats  # noqa: E402
from icu.forget_eval import evaluate_forget_set  # noqa: E402
from icu.metrics import get_bertscorer  # noqa: E402
from icu.models import load_model, load_tokenizer, parse_dtype, resolve_bertscore_model  # noqa: E402

NEO125M = dict(
    vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
    attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy,random", help="comma list of toy, random, neo125m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--target_length", type=int, default=200)
    p.add_argument("--el_n", default="10", help="comma list of n")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--toy_dir", default=os.environ.get("ICU_TOY_DIR", os.path.join(REPO, "datasets", "toy")))
    p.add_argument("--bert_name", default="builtin:all-MiniLM-L6-v2")
    p.add_argument("--parts", default="ma,el,whole", help="comma list of ma, el, whole")
    p.add_argument("--seed", type=int, default=0, help="seed of the random models")
    p.add_argument("--out", default=None, help="write the results to this .json or .csv")
    return p.parse_args(argv)


class Clock:
    """Seconds of one timed section: wall clock, and this process's CPU time.

    On a shared CPU machine other people's jobs stretch the wall clock but not the CPU time
    (with one torch thread, CPU time is the compute this process needed), so CPU speed-ups
    use CPU time; on CUDA the GPU's work is only visible in the wall clock.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self._sync()
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def seconds(self) -> float:
        return self.wall if self.device.type == "cuda" else self.cpu


def random_neo(config_kwargs: dict, seed: int, dtype: torch.dtype, device: torch.device):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoConfig(
        **config_kwargs, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
    )
    model = GPTNeoForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    model.generation_config.pad_token_id = 50256
    return model


def load_rows(args, need: int):
    """(rows, doc_ids, source): toy targets when the toy world exists (built for toy/random)."""
    meta_path = os.path.join(args.toy_dir, "toy.json")
    models = args.model.split(",")
    if not os.path.isfile(meta_path) and any(m in ("toy", "random") for m in models):
        from icu.toy import build_toy

        print(f"building the toy world in {args.toy_dir} (a few minutes)...", flush=True)
        build_toy(args.toy_dir)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        train = np.load(os.path.join(args.toy_dir, "train_dataset.npy"))
        ids = np.asarray(meta["target_ids"][:need], dtype=np.int64)
        return train[ids], ids, f"toy targets ({len(ids)})"
    rng = np.random.default_rng(args.seed)
    rows = rng.integers(0, 50256, size=(need, 200)).astype(np.uint16)
    return rows, np.arange(need), f"random GPT-2 id rows ({need})"


def max_diff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    d = np.abs(a - b)
    d[both_nan] = 0.0
    return float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0


def bench_model(name: str, args, device, dtype, gpt2, scorer, bert_path, bert_layers) -> list[dict]:
    from reference_impl import reference_evaluate, slow_el, slow_ma

    el_ns = tuple(int(n) for n in args.el_n.split(","))
    T = args.target_length
    if name == "toy":
        model = load_model(os.path.join(args.toy_dir, "model"), dtype=args.dtype, device=device)
        tok = load_tokenizer(os.path.join(args.toy_dir, "model"))
    elif name == "random":
        from icu.toy import tiny_neo_config

        model = random_neo(
            {k: getattr(tiny_neo_config(), k) for k in
             ("vocab_size", "hidden_size", "num_layers", "num_heads", "attention_types",
              "window_size", "max_position_embeddings", "intermediate_size")},
            args.seed, dtype, device,
        )
        tok = gpt2
    elif name == "neo125m":
        model = random_neo(NEO125M, args.seed, dtype, device)
        tok = gpt2
    else:
        raise SystemExit(f"unknown --model {name!r}; use toy, random or neo125m")
    rows, doc_ids, source = load_rows(args, args.num_samples)
    data = encode_rows(rows, doc_ids, gpt2, tok)
    x, m = data.input_ids, data.attention_mask
    pad = tok.pad_token_id
    n = len(data)
    B = args.batch_size
    parts = set(args.parts.split(","))
    print(f"\n== {name}: {n} samples of {source}, batch {B}, T={T}, {device}, {args.dtype}", flush=True)

    # Warm-up on one sample: imports, Punkt model, kernels, the BERTScore model.
    evaluate_forget_set(model, tok, gpt2, data, scorer=scorer, batch_size=B, target_length=T,
                        el_ns=el_ns, indices=[0], progress=False)
    slow_ma(model, x[:1, :8], m[:1, :8], 8, pad)

    out = []
    basis = "wall" if device.type == "cuda" else "cpu"

    def row(metric, ref: dict, fast: dict, diff, note=""):
        r = dict(model=name, metric=metric,
                 reference_s=round(ref[basis], 3), fast_s=round(fast[basis], 3),
                 speedup=round(ref[basis] / fast[basis], 2) if fast[basis] > 0 else float("inf"),
                 reference_wall_s=round(ref["wall"], 3), fast_wall_s=round(fast["wall"], 3),
                 speedup_wall=round(ref["wall"] / fast["wall"], 2) if fast["wall"] > 0 else float("inf"),
                 max_abs_diff=diff, note=note)
        out.append(r)
        print(f"  {metric:<17} reference {r['reference_s']:8.2f} s  fast {r['fast_s']:7.2f} s  "
              f"x{r['speedup']:<6} ({basis} time; wall x{r['speedup_wall']})  max|diff| {diff:.3g}  {note}",
              flush=True)

    def secs(clock: Clock) -> dict:
        return {"wall": clock.wall, "cpu": clock.cpu}

    ref_ma = ref_el = None
    if "ma" in parts or "whole" in parts:
        ref_ma = []
        with Clock(device) as c:
            for s in range(0, n, B):
                ref_ma += slow_ma(model, x[s:s + B], m[s:s + B], T, pad)
        ref_ma_s = secs(c)
    if "ma" in parts:
        with Clock(device) as c:
            fast_ma, _ = memorization_and_extraction(model, x, m, T, (), pad_token_id=pad, batch_size=B)
        row("MA", ref_ma_s, secs(c), max_diff(fast_ma.numpy(), ref_ma))
    if "el" in parts or "whole" in parts:
        ref_el = {k: [] for k in el_ns}
        with Clock(device) as c:
            for s in range(0, n, B):
                res = slow_el(model, x[s:s + B], m[s:s + B], T, el_ns, pad)
                for k in el_ns:
                    ref_el[k] += res[k]
        ref_el_s = secs(c)
    if "el" in parts:
        stats = GreedyStats()
        with Clock(device) as c:
            _, fast_el = memorization_and_extraction(model, x, m, T, el_ns, pad_token_id=pad, batch_size=B,
                                                     stats=stats)
        note = f"(fast incl. its forward; decoded {stats.decoded_rows}/{stats.prefixes} prefixes)"
        row("EL_" + ",".join(map(str, el_ns)), ref_el_s, secs(c),
            max(max_diff(fast_el[k].numpy(), ref_el[k]) for k in el_ns), note)
    if "whole" in parts:
        # The reference's generation check and loss (its MA and EL were timed above).
        with Clock(device) as c:
            ref = reference_evaluate(model, tok, gpt2, data, bert_path=bert_path, bert_layers=bert_layers,
                                     batch_size=B, target_length=T, el_ns=el_ns, ma=False, el=False)
        ref_s = {k: secs(c)[k] + ref_ma_s[k] + ref_el_s[k] for k in ("wall", "cpu")}
        with Clock(device) as c:
            res = evaluate_forget_set(model, tok, gpt2, data, scorer=scorer, batch_size=B,
                                      target_length=T, el_ns=el_ns, progress=False)
        a, b = res.per_sample, ref["per_sample"]
        b = b.assign(ma=ref_ma, **{f"el_{k}": ref_el[k] for k in el_ns})
        cols = ["bleu", "P", "R", "F1", "diff", "entropy", "ma"] + [f"el_{k}" for k in el_ns]
        diffs = {col: max_diff(a[col].to_numpy(), b[col].to_numpy()) for col in cols}
        diffs["val_loss"] = abs(res.val_loss - ref["val_loss"])
        same = int((a["candidate"].to_numpy() == b["candidate"].to_numpy()).sum())
        mael = max(diffs[col] for col in ["ma"] + [f"el_{k}" for k in el_ns])
        row("whole evaluation", ref_s, secs(c), mael,
            f"(max|diff| of MA/EL; {same}/{n} candidates identical; other columns: "
            + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items() if not k.startswith(("ma", "el_")))
            + "; fast phases (wall): " + ", ".join(f"{k} {v:.2f}s" for k, v in res.seconds.items())
            + "; reference parts (wall): " + ", ".join(f"{k} {v:.2f}s" for k, v in ref["seconds"].items())
            + ")")
        out[-1]["diffs"] = diffs
        out[-1]["fast_phases_wall_s"] = {k: round(v, 3) for k, v in res.seconds.items()}
    del model
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    gpt2 = load_tokenizer("builtin:gpt2")
    t0 = time.perf_counter()
    scorer = get_bertscorer(args.bert_name, device)
    load_s = time.perf_counter() - t0
    bert_path, bert_layers = resolve_bertscore_model(args.bert_name)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print(f"BERTScore model ({args.bert_name}) loaded once in {load_s:.2f} s")
    results = []
    for name in [s.strip() for s in args.model.split(",") if s.strip()]:
        results += bench_model(name, args, device, dtype, gpt2, scorer, bert_path, bert_layers)

    basis = "wall clock" if device.type == "cuda" else "CPU time of this process"
    print(f"\n| model | metric | reference (s) | fast (s) | speed-up | wall speed-up | max abs diff |  ({basis})")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['metric']} | {r['reference_s']:.2f} | {r['fast_s']:.2f} | "
              f"{r['speedup']:.1f}x | {r['speedup_wall']:.1f}x | {r['max_abs_diff']:.3g} |")
    if args.out:
        meta = dict(device=str(device), dtype=args.dtype, threads=torch.get_num_threads(),
                    batch_size=args.batch_size, num_samples=args.num_samples,
                    target_length=args.target_length, torch=torch.__version__,
                    bertscore_load_s=round(load_s, 3))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.out.endswith(".csv"):
            import pandas as pd

            pd.DataFrame([{**meta, **{k: v for k, v in r.items() if k != "diffs"}} for r in results]).to_csv(
                args.out, index=False)
        else:
            with open(args.out, "w", encoding="utf-8") as fh:
                json.dump({"config": meta, "results": results}, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
