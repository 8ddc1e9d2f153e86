"""Time ``eval.py --calibrate`` (MA, EL_n and the generation check on unseen rows).

    python bench/bench_calibration.py                               # toy model, 64 held-out rows, CPU
    python bench/bench_calibration.py --model neo125m --device cuda --rows 1000 \\
        --unseen ../shared/data/lm-extraction/val_dataset.npy [--el_start 1] [--dtype bf16]

``neo125m`` is a random model shaped like EleutherAI/gpt-neo-125m (it memorized nothing, so
nearly every EL prefix is decoded: the slow case). Without ``--unseen`` the toy world's held-out
rows are used. Prints the wall time of the whole calibration and of its phases (from the log).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", choices=["toy", "neo125m"])
    p.add_argument("--toy_dir", default=os.path.join(REPO, "datasets", "toy"))
    p.add_argument("--unseen", default=None, help="(N, 200) uint16 rows; default: the toy's held-out rows")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--el_start", type=int, default=150)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--bert_name", default="builtin:all-MiniLM-L6-v2")
    args = p.parse_args(argv)

    import eval as eval_script

    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(args.toy_dir, "model")
        if args.model == "neo125m":
            import torch
            from bench_forget_eval import NEO125M, random_neo
            from icu.models import load_tokenizer

            model_path = os.path.join(tmp, "neo125m")
            random_neo(NEO125M, 0, torch.float32, torch.device("cpu")).save_pretrained(model_path)
            load_tokenizer("builtin:gpt2").save_pretrained(model_path)
        source = ["--unseen", args.unseen] if args.unseen else [
            "--unseen_rows", os.path.join(args.toy_dir, "heldout_ids.npy"),
            "--train_file", os.path.join(args.toy_dir, "train_dataset.npy")]
        out = os.path.join(tmp, "out")
        t0 = time.perf_counter()
        eval_script.main([
            "--calibrate", *source, "--limit", str(args.rows), "--model_name", model_path,
            "--gpt2_name", "builtin:gpt2", "--bert_name", args.bert_name, "--device", args.device,
            "--dtype", args.dtype, "--batch_size", str(args.batch_size), "--el_start", str(args.el_start),
            "--dir", out, "--no_progress", "--data_dir", os.path.join(tmp, "none"),
        ])
        wall = time.perf_counter() - t0
        with open(os.path.join(out, "thresholds.json"), encoding="utf-8") as fh:
            th = json.load(fh)
        with open(os.path.join(out, "eval.log"), encoding="utf-8") as fh:
            phases = [line.strip() for line in fh if "calibration:" in line]
    print(f"\ncalibration of {args.model} on {th['n_rows']} rows, EL from prefix {args.el_start}, "
          f"{args.device} {args.dtype}: {wall:.1f} s wall (model load included), "
          f"{th['seconds']:.1f} s scoring")
    print(phases[-1] if phases else "")
    print(f"MA {th['ma']:.4f}  EL {th['el']}  F1 {th['f1']:.4f}  BLEU {th['bleu']:.4f}")


if __name__ == "__main__":
    main()
