"""Time one ICU training epoch on one GPU with both engines: TorchEngine (the single-device
trainer) and DeepSpeedEngine (the DeepSpeed trainer, one rank).

    python bench/bench_deepspeed_epoch.py --data_dir datasets/exp --exp exp0
    python bench/bench_deepspeed_epoch.py --synthetic 128            # random token rows, no data
    python bench/bench_deepspeed_epoch.py --data_dir ... --deepspeed_config config/deepspeed1.json

The model is GPT-Neo-125M-shaped (768 hidden, 12 layers, alternating global/local attention,
vocab 50257) with random weights, so nothing is downloaded. Every pair is flagged, so the
epoch does the full work. Default DeepSpeed config: ZeRO-2, fp32, no offload, the same
precision as TorchEngine, so the numbers compare the engines; pass config/deepspeed1.json for
the paper's bf16 + CPU-offload setting. Prints one JSON line per engine (and writes
bench/out/deepspeed_epoch.json); run it alone on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from icu.data import PairedDataset, encode_rows, load_experiment  # noqa: E402
from icu.ds_config import build_ds_config, reconcile_ds_config  # noqa: E402
from icu.engine import DeepSpeedEngine, TorchEngine, init_deepspeed_distributed  # noqa: E402
from icu.loop import ICULoop, LoopConfig  # noqa: E402
from icu.models import load_tokenizer  # noqa: E402


def neo_125m(seed: int):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(
        vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
        resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
    )
    torch.manual_seed(seed)
    return GPTNeoForCausalLM(cfg)


def load_pairs(args) -> PairedDataset:
    gpt2 = load_tokenizer("builtin:gpt2")
    if args.synthetic:
        rng = np.random.default_rng(0)
        unlearn = rng.integers(0, 50000, size=(args.synthetic, 200)).astype(np.uint16)
        learn = rng.integers(0, 50000, size=(args.synthetic, 200)).astype(np.uint16)
        uid, lid = np.arange(args.synthetic), np.arange(args.synthetic) + args.synthetic
    else:
        unlearn, uid, learn, lid = load_experiment(args.data_dir, args.exp)
    if args.limit:
        unlearn, uid, learn, lid = unlearn[: args.limit], uid[: args.limit], learn[: args.limit], lid[: args.limit]
    enc = lambda rows, ids: encode_rows(rows, ids, gpt2, gpt2, args.length, args.length)
    return PairedDataset(enc(unlearn, uid), enc(learn, lid))


def time_epoch(name: str, engine, data: PairedDataset, reference, args, device) -> dict:
    cfg = LoopConfig(exp=args.exp, model_name="neo-125m", dir=args.out, lr=args.lr, batch_size=args.batch_size,
                     target_length=args.length, max_epochs=1)
    loop = ICULoop(engine, cfg, tokenizer=None, gpt2_tokenizer=None, dataset=data, reference_model=reference,
                   scorer=None)
    loop.state.flags = np.ones(len(data), dtype=np.int64)
    results = []
    for epoch in range(1, args.repeats + 2):  # the first epoch warms up kernels and allocators
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        stats = loop.train_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    row = {
        "engine": name, "pairs": len(data), "batch_size": args.batch_size, "steps": stats["steps"],
        "warmup_s": round(results[0], 3), "epoch_s": round(min(results[1:]), 3),
        "epoch_s_all": [round(r, 3) for r in results[1:]],
        "steps_per_s": round(stats["steps"] / min(results[1:]), 3), "peak_gib": None if peak is None else round(peak, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.path.join("datasets", "exp"))
    p.add_argument("--exp", default="exp0")
    p.add_argument("--synthetic", type=int, default=0, help="use N random pairs instead of --data_dir")
    p.add_argument("--limit", type=int, default=0, help="use only the first N pairs")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--length", type=int, default=200, help="--prefix_length = --suffix_length")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--repeats", type=int, default=2, help="timed epochs after the warm-up epoch")
    p.add_argument("--deepspeed_config", default=None, help="default: ZeRO-2 fp32, no offload")
    p.add_argument("--engines", default="torch,deepspeed")
    p.add_argument("--out", default=os.path.join("bench", "out"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    _, _, _, device = init_deepspeed_distributed()
    data = load_pairs(args)
    rows = []
    for name in args.engines.split(","):
        model = neo_125m(0).to(device)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        if name == "torch":
            engine = TorchEngine(model, args.lr, device)
        else:
            kw = dict(lr=args.lr, batch_size=args.batch_size, world_size=1, on_cpu=device.type == "cpu")
            ds = (build_ds_config(args.deepspeed_config, **kw) if args.deepspeed_config
                  else reconcile_ds_config({"zero_optimization": {"stage": 2}}, **kw))
            engine = DeepSpeedEngine(model, ds.config)
        rows.append(time_epoch(name, engine, data, reference, args, device))
        del engine, model, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "deepspeed_epoch.json"), "w") as fh:
        json.dump({"args": vars(args), "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
