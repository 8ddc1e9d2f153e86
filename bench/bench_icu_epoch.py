"""Seconds per ICU epoch and per validation, and peak memory, for a GPT-Neo-125M-shaped model.

The model (EleutherAI/gpt-neo-125m's config, random init) is first trained briefly to memorize
the toy world's 32 targets, so ICU has something to unlearn; then the single-device trainer
runs validation (epoch 0), one ICU epoch, and validation again (with the flag and stop
thresholds set to 0, so exactly one epoch over all samples is timed).

    python bench/bench_icu_epoch.py --device cuda                      # fp32
    python bench/bench_icu_epoch.py --device cuda --dtype bf16 --kl_dtype bf16
    python bench/bench_icu_epoch.py --device cpu --model tiny          # a quick CPU smoke run

Needs the toy world (`python -m icu.toy`) and its data_prep output for exp0 (the demo makes
both); prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np
import torch


def neo125m_config():
    from transformers import GPTNeoConfig

    return GPTNeoConfig(
        vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
        intermediate_size=None, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
        bos_token_id=50256, eos_token_id=50256,
    )


def memorize(model, rows: torch.Tensor, device, max_steps: int, target_ma: float = 0.9) -> tuple[int, float]:
    """Full-vocabulary training on ``rows`` (and their last 100 tokens) until MA >= target_ma."""
    from icu.toy import teacher_forced_ma

    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    x = rows.to(device)
    ma = 0.0
    model.train()
    for step in range(1, max_steps + 1):
        for batch in (x, x[:, 100:]):
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            model.eval()
            ma = float(teacher_forced_ma(model, x, batch_size=16).mean())
            model.train()
            if ma >= target_ma:
                break
    model.eval()
    return step, ma


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", default=os.path.join(REPO, "datasets", "toy"))
    p.add_argument("--model", default="neo125m", choices=["neo125m", "tiny"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--kl_dtype", default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--memorize_steps", type=int, default=300)
    p.add_argument("--bert_name", default="builtin:all-MiniLM-L6-v2")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    args = p.parse_args()

    from transformers import GPTNeoForCausalLM

    import train_neo_meanwhile_update as trainer
    from icu.models import BUILTIN_GPT2, load_tokenizer
    from icu.toy import tiny_neo_config

    device = torch.device(args.device)
    exp = os.path.join(args.toy, "exp")
    if not os.path.isfile(os.path.join(exp, "exp0", "learn", "_dataset.npy")):
        sys.exit(f"no data_prep output under {exp}/exp0; run scripts/demo.sh (or data_prep.py) first")
    unlearn = np.load(os.path.join(exp, "exp0", "unlearn", "_dataset.npy")).astype(np.int64)

    torch.manual_seed(0)
    config = neo125m_config() if args.model == "neo125m" else tiny_neo_config()
    model = GPTNeoForCausalLM(config).to(device)
    t0 = time.time()
    steps, ma = memorize(model, torch.as_tensor(unlearn), device, args.memorize_steps)
    t_mem = time.time() - t0
    work = tempfile.mkdtemp(prefix="icu-bench-epoch-")
    model_dir = os.path.join(work, "memorized")
    model.save_pretrained(model_dir)
    load_tokenizer(BUILTIN_GPT2).save_pretrained(model_dir)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    run_dir = os.path.join(work, "run")
    t0 = time.time()
    trainer.main([
        "--exp", "exp0", "--data_dir", exp, "--model_name", model_dir, "--gpt2_name", BUILTIN_GPT2,
        "--bert_name", args.bert_name, "--device", args.device, "--dtype", args.dtype,
        "--batch_size", str(args.batch_size), "--max_epochs", "1", "--dir", run_dir,
        # thresholds off: every sample stays flagged and the stop rule cannot end the run before
        # the one timed epoch, whatever the memorizing step reached
        "--f1", "0", "--bleu", "0", "--acc", "0", "--el", "0",
        *(["--kl_dtype", args.kl_dtype] if args.kl_dtype else []),
    ])
    total = time.time() - t0
    import pandas as pd

    hist = pd.read_csv(os.path.join(run_dir, "history.csv"))
    result = {
        "model": args.model, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": args.dtype, "kl_dtype": args.kl_dtype or args.dtype, "batch_size": args.batch_size,
        "samples": int(len(unlearn)), "memorize_steps": steps, "ma_after_memorizing": round(ma, 4),
        "memorize_seconds": round(t_mem, 1),
        "seconds_validation_epoch0": float(hist.loc[0, "seconds_valid"]),
        "seconds_train_epoch1": float(hist.loc[1, "seconds_train"]) if len(hist) > 1 else None,
        "seconds_validation_epoch1": float(hist.loc[1, "seconds_valid"]) if len(hist) > 1 else None,
        "seconds_whole_run": round(total, 1),
        "ma": hist["acc"].round(4).tolist(), "el_10": hist["el_10"].round(4).tolist(),
        "flagged": hist["flagged"].tolist(),
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    for k, v in result.items():
        print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
