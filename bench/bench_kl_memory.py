"""Peak memory of the KL reference: frozen copy (default) vs the reference's N x L x V cache.

Each configuration runs in its own process (one training epoch of the ICU loop on toy rows) and
reports that process's peak resident memory, so the numbers do not bleed into each other.

    python bench/bench_kl_memory.py                  # 32 and 128 samples, both modes, CPU
    python bench/bench_kl_memory.py --device cuda    # also reports peak GPU memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def child(mode: str, n: int, toy: str, device: str) -> None:
    import numpy as np
    import torch

    from icu.data import PairedDataset, encode_rows
    from icu.engine import TorchEngine
    from icu.loop import ICULoop, LoopConfig
    from icu.models import BUILTIN_GPT2, load_model, load_tokenizer

    dev = torch.device(device)
    rows = np.load(os.path.join(toy, "train_dataset.npy"))
    gpt2 = load_tokenizer(BUILTIN_GPT2)
    enc = lambda r, ids: encode_rows(r, ids, gpt2, gpt2)
    ds = PairedDataset(enc(rows[:n], range(n)), enc(rows[n : 2 * n], range(n, 2 * n)))
    model = load_model(os.path.join(toy, "model"), device=dev)
    ref = load_model(os.path.join(toy, "model"), device=dev).requires_grad_(False)
    cfg = LoopConfig(exp="bench", model_name="toy", dir="/tmp/icu-bench-kl", lr=1e-4, batch_size=8, kl_mode=mode)
    loop = ICULoop(TorchEngine(model, cfg.lr, dev), cfg, tokenizer=gpt2, gpt2_tokenizer=gpt2,
                   dataset=ds, reference_model=ref, scorer=None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    if mode == "cached":
        loop.build_kl_cache()
    loop.state.flags = np.ones(n, dtype=np.int64)
    loop.train_epoch(1)
    out = {
        "mode": mode, "samples": n, "seconds": round(time.time() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", default=os.path.join(REPO, "datasets", "toy"))
    p.add_argument("--samples", default="32,128")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.toy, args.device)
        return
    if not os.path.isdir(os.path.join(args.toy, "model")):
        sys.exit(f"no toy world at {args.toy}; run `python -m icu.toy` first")
    rows = []
    for n in [int(x) for x in args.samples.split(",")]:
        for mode in ("frozen", "cached"):
            r = subprocess.run([sys.executable, __file__, "--toy", args.toy, "--device", args.device,
                                "--child", mode, str(n)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(r.stderr[-2000:])
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\n{'samples':>8} {'mode':>8} {'peak RSS MB':>12} {'peak GPU MB':>12} {'seconds':>8}")
    for r in rows:
        print(f"{r['samples']:>8} {r['mode']:>8} {r['peak_rss_mb']:>12} {r.get('peak_gpu_mb', '-'):>12} {r['seconds']:>8}")


if __name__ == "__main__":
    main()
