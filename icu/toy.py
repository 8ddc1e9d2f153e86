"""The offline toy world: a synthetic lm-extraction corpus, a 32-target split, and a tiny GPT-Neo
that has memorized those targets. ``python -m icu.toy`` builds it (about 2 minutes on 2 CPU
cores) or returns at once when it is already built.

Layout under ``--out`` (default ``datasets/toy``)::

    train_dataset.npy                     (2000, 200) uint16 GPT-2 ids, lm-extraction format
    exp/exp0/lm_extraction_32_0.csv       doc_id, corpus, text: the 32 targets
    heldout_ids.npy                       rows the model never saw (for "general ability" checks)
    model/                                GPTNeoForCausalLM + tokenizer, save_pretrained format
    toy.json                              settings, timings and MA on targets / held-out rows

Determinism: the corpus, the split and the held-out ids depend only on the seed. The model's
weights are bit-identical across builds with the same torch version and thread count; another
thread count changes float summation order, so weights (and MA to the third decimal) differ
slightly (measured: held-out MA 0.554 with 1 thread, 0.563 with 2; targets 0.995 both).

Training: every step mixes targets with rows from a "seen" half of the non-target rows, so the
model memorizes the targets (each seen hundreds of times, as duplicated Pile text is) and learns
the corpus style from the rest; the other half is held out. To keep a 50257-way softmax
affordable on a CPU, the training loss is a softmax over the token ids the corpus uses (about
500); the other embedding rows are never updated. Evaluation (MA) uses the full vocabulary.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .console import bar_disabled, setup_console
from .data import PREPREFIX_END, ROW_LEN, atomic_write_text, write_split_csv
from .errors import exit_on_user_error
from .models import builtin_gpt2_tokenizer
from .toytext import generate_families

logger = logging.getLogger("icu")

DEFAULTS = dict(
    seed=0,
    num_docs=2000,
    family_size=10,
    num_targets=32,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    steps=900,
    batch_targets=16,
    batch_seen=12,
    lr=3e-3,
    target_ma=0.9,
)
TOY_VERSION = 2


def _settings_key(settings: dict) -> str:
    blob = json.dumps({**settings, "version": TOY_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_corpus(seed: int, num_docs: int, family_size: int, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(rows (num_docs, 200) uint16, family index per row)."""
    docs = generate_families(num_docs, family_size, seed, sentences_per_doc=18)
    enc = tokenizer([text for _, text in docs])["input_ids"]
    short = [i for i, ids in enumerate(enc) if len(ids) < ROW_LEN]
    if short:  # the generator makes ~240-token docs; this only guards a generator change
        raise RuntimeError(f"toy document {short[0]} has fewer than {ROW_LEN} tokens")
    rows = np.asarray([ids[:ROW_LEN] for ids in enc], dtype=np.uint16)
    families = np.asarray([fam for fam, _ in docs], dtype=np.int64)
    return rows, families


def tiny_neo_config(hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, vocab_size: int = 50257,
                    **overrides):
    """A GPT-Neo config small enough to train on a CPU (global attention, dropout off).

    ``overrides`` replace any other GPTNeoConfig field (tests use local attention, other token ids).
    """
    from transformers import GPTNeoConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        attention_types=[[["global"], num_layers]],
        intermediate_size=4 * hidden_size,
        max_position_embeddings=256,
        window_size=256,
        resid_dropout=0.0,
        embed_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
    )
    return GPTNeoConfig(**{**fields, **overrides})


@torch.no_grad()
def teacher_forced_ma(model, rows: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Per-row MA: fraction of positions 1..T-1 where argmax(logits at i-1) == x_i (no padding)."""
    out = []
    for start in range(0, rows.shape[0], batch_size):
        x = rows[start : start + batch_size]
        pred = model(input_ids=x).logits[:, :-1].argmax(-1)
        out.append((pred == x[:, 1:]).float().mean(1))
    return torch.cat(out).cpu().numpy()


def _train(model, targets: torch.Tensor, seen: torch.Tensor, used: torch.Tensor, s: dict, gen) -> int:
    """Memorize ``targets`` while learning ``seen``; returns the number of steps run.

    Each step also trains on the targets' last 100 tokens (prefix + suffix) as a sequence of
    its own: a model that memorized text only at its absolute positions could not continue a
    target from its 50-token prefix, which is what ICU's generation check asks of it (a large
    model that saw duplicated text at many offsets can).
    """
    wte = model.transformer.wte.weight
    remap = torch.full((wte.shape[0],), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
    model.train()
    check_every = 50
    step = 0
    from tqdm.auto import tqdm

    def restricted_loss(x: torch.Tensor) -> torch.Tensor:
        hidden = model.transformer(input_ids=x).last_hidden_state[:, :-1]
        logits = hidden @ wte[used].T  # softmax over the corpus's own token ids
        return F.cross_entropy(logits.reshape(-1, len(used)), remap[x[:, 1:]].reshape(-1))

    window = targets[:, PREPREFIX_END:]
    bar = tqdm(total=s["steps"], desc="toy model", unit="step", disable=bar_disabled())
    while step < s["steps"]:
        ti = torch.randint(0, len(targets), (s["batch_targets"],), generator=gen)
        si = torch.randint(0, len(seen), (s["batch_seen"],), generator=gen)
        wi = torch.randint(0, len(targets), (s["batch_targets"],), generator=gen)
        loss = restricted_loss(torch.cat([targets[ti], seen[si]])) + restricted_loss(window[wi])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % check_every == 0 and step >= s["steps"] // 3:
            model.eval()
            ma = float(teacher_forced_ma(model, targets).mean())
            ma_window = float(teacher_forced_ma(model, window).mean())
            model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", target_ma=f"{ma:.3f}", window_ma=f"{ma_window:.3f}")
            if ma >= max(s["target_ma"], 0.97) and ma_window >= s["target_ma"]:
                break
    bar.close()
    model.eval()
    return step


def build_toy(out: str, **overrides) -> dict:
    """Build the toy world in ``out`` (or return its metadata when already built)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # Processes asking for the same world at once (pytest -n, two scripts) take turns: the first
    # builds it, the others then find it built.
    with open(os.path.join(parent, os.path.basename(out.rstrip("/")) + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_toy(out, overrides)


def _build_toy(out: str, overrides: dict) -> dict:
    s = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    key = _settings_key(s)
    meta_path = os.path.join(out, "toy.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        if meta.get("key") == key and os.path.isdir(os.path.join(out, "model")):
            logger.info("toy world already built in %s", out)
            return meta

    from transformers import GPTNeoForCausalLM

    t0 = time.time()
    torch.manual_seed(s["seed"])
    gen = torch.Generator().manual_seed(s["seed"])
    rng = np.random.default_rng(s["seed"])
    tok = builtin_gpt2_tokenizer()
    rows, families = build_corpus(s["seed"], s["num_docs"], s["family_size"], tok)

    n = len(rows)
    target_ids = np.sort(rng.choice(n, size=s["num_targets"], replace=False))
    others = np.setdiff1d(np.arange(n), target_ids)
    perm = rng.permutation(others)
    seen_ids = np.sort(perm[: len(perm) // 2])
    heldout_ids = np.sort(perm[len(perm) // 2 :])

    rows_t = torch.as_tensor(rows.astype(np.int64))
    used = torch.as_tensor(np.unique(rows).astype(np.int64))
    model = GPTNeoForCausalLM(tiny_neo_config(s["hidden_size"], s["num_layers"], s["num_heads"]))
    steps = _train(model, rows_t[target_ids], rows_t[seen_ids], used, s, gen)
    ma_targets = teacher_forced_ma(model, rows_t[target_ids])
    ma_window = teacher_forced_ma(model, rows_t[target_ids][:, PREPREFIX_END:])
    ma_heldout = teacher_forced_ma(model, rows_t[heldout_ids[:256]])

    # Write into a temporary sibling folder, then swap it in: a crash leaves the old world intact.
    tmp = out.rstrip("/") + ".tmp-build"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "exp", "exp0"))
    np.save(os.path.join(tmp, "train_dataset.npy"), rows)
    np.save(os.path.join(tmp, "heldout_ids.npy"), heldout_ids.astype(np.int64))
    write_split_csv(
        os.path.join(tmp, "exp", "exp0", f"lm_extraction_{s['num_targets']}_0.csv"),
        target_ids.tolist(),
        tok.batch_decode(rows[target_ids].astype(np.int64).tolist()),
        corpus="toy",
    )
    model.save_pretrained(os.path.join(tmp, "model"))
    tok.save_pretrained(os.path.join(tmp, "model"))
    meta = {
        "key": key,
        "settings": s,
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        # The corpus, split and held-out ids depend only on the seed; the trained weights are
        # bit-identical only for the same torch version and thread count (float reduction order).
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ma_targets_mean": float(ma_targets.mean()),
        "ma_targets_min": float(ma_targets.min()),
        "ma_targets_window_mean": float(ma_window.mean()),
        "ma_heldout_mean": float(ma_heldout.mean()),
        "num_rows": int(n),
        "target_ids": target_ids.tolist(),
        "num_seen": int(len(seen_ids)),
        "num_heldout": int(len(heldout_ids)),
        "families": families.tolist(),
    }
    atomic_write_text(os.path.join(tmp, "toy.json"), json.dumps(meta, indent=1))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info(
        "toy world built in %.0f s: MA on targets %.3f, on held-out rows %.3f",
        meta["seconds"], meta["ma_targets_mean"], meta["ma_heldout_mean"],
    )
    return meta


def toy_paths(out: str) -> dict[str, str]:
    """The files a built toy world offers, by role."""
    return {
        "train_file": os.path.join(out, "train_dataset.npy"),
        "exp_dir": os.path.join(out, "exp"),
        "model": os.path.join(out, "model"),
        "heldout_ids": os.path.join(out, "heldout_ids.npy"),
        "meta": os.path.join(out, "toy.json"),
    }


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m icu.toy")
    p.add_argument("--out", default=os.path.join("datasets", "toy"), help="output folder")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--num_docs", type=int, default=DEFAULTS["num_docs"])
    p.add_argument("--num_targets", type=int, default=DEFAULTS["num_targets"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="upper bound on steps")
    args = p.parse_args(argv)
    setup_console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    meta = build_toy(
        args.out, seed=args.seed, num_docs=args.num_docs, num_targets=args.num_targets, steps=args.steps
    )
    print(
        f"toy world in {args.out}: {meta['num_rows']} rows, {len(meta['target_ids'])} targets; "
        f"MA targets {meta['ma_targets_mean']:.3f} (min {meta['ma_targets_min']:.3f}), "
        f"held-out {meta['ma_heldout_mean']:.3f}; built in {meta['seconds']} s"
    )


if __name__ == "__main__":
    main()
