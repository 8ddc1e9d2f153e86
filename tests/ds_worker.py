"""Run by tests/test_deepspeed_multirank.py under ``torchrun --nproc_per_node 2`` (not a test module).

Drives ICULoop through DeepSpeedEngine on a tiny random GPT-Neo with a weights-dependent stand-in
evaluator (the models, data, evaluator and loop of tests/tiny.py, as the in-process tests use), so the multi-rank logic (sampler, loss weighting, sharded validation, checkpoints,
ZeRO-3 gathering) is checked in seconds. Each run writes its usual files under ``OUT/<name>``:

    full     DeepSpeed ZeRO-2, uninterrupted
    killed   DeepSpeed ZeRO-2, interrupted before epoch 2, then resumed from its checkpoint
    zero3    DeepSpeed ZeRO-3, uninterrupted
    single   TorchEngine on rank 0 with batch B x W (the single-device trainer's engine)
    npo, npo_single   the same pair of runs for a non-ICU method (NPO with learn and KL terms)

and ``OUT/thr.json`` (the evaluator's threshold), ``OUT/uneven.pt`` (one epoch with flags that
leave the ranks different numbers of samples: DeepSpeed vs single-device weights and losses).
The test compares the files.

``ds_worker.py OUT llama`` instead runs the tiny Llama (GQA, RoPE, tied embeddings, its own
tokenizer) on its own pairs: ``llama_zero3`` (ZeRO-3: every validation and the save go through
the gathered full copy) and ``llama_single`` (TorchEngine, batch B x W, on rank 0).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]  # the repository (icu) and tests/ (tiny)

from icu.ds_config import reconcile_ds_config  # noqa: E402
from icu.engine import DeepSpeedEngine, TorchEngine, epoch_seed, init_deepspeed_distributed  # noqa: E402
from tiny import (LossEval, family_pairs, gpt2_tokenizer, make_loop, tiny_llama, tiny_llama_tokenizer,  # noqa: E402
                  tiny_neo)

N = 8  # unlearn/learn pairs of generated family text
MICRO = 2  # batch per rank
LR = 1e-3
EPOCHS = 3
SEED = 42  # LoopConfig's default


def ds_config(stage: int, micro: int = MICRO) -> dict:
    """A minimal JSON through the trainer's reconciliation (fp32, torch Adam, no clipping)."""
    raw = {"zero_optimization": {"stage": stage}, "optimizer": {"type": "Adam", "params": {"lr": 0.5}}}
    return reconcile_ds_config(raw, lr=LR, batch_size=micro, world_size=int(os.environ["WORLD_SIZE"]),
                               on_cpu=True).config


def ds_loop(engine, out: str, data, thr: float, batch_size: int, model_for_ref, **cfg_kw):
    """tiny.make_loop with this worker's settings: the loss-flag evaluator, 3 epochs, no MA stop."""
    return make_loop(out, data, LossEval(thr), engine=engine, reference=model_for_ref, lr=LR,
                     batch_size=batch_size, eval_batch_size=3, max_epochs=EPOCHS, acc=0.0, **cfg_kw)


def main() -> None:
    out = sys.argv[1]
    rank, _, world, device = init_deepspeed_distributed()
    data = family_pairs(gpt2_tokenizer(), N, 4, seed=3)
    init = LossEval(0.0)(tiny_neo(), None, None, data.unlearn, indices=range(N)).per_sample["loss"]
    thr = float(init.max()) + 0.02  # all flagged at epoch 0; ascent unflags them one by one
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "thr.json"), "w") as fh:
            json.dump({"thr": thr, "world_size": world}, fh)

    def ds_run(name: str, stage: int, model=None, resume: bool = False, kill_at: int = 0, **cfg_kw):
        model = model or tiny_neo()
        original = tiny_neo()  # the KL target is always the original model
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        loop = ds_loop(DeepSpeedEngine(model, ds_config(stage)), d, data, thr, MICRO, original, **cfg_kw)
        if kill_at:
            orig = loop.train_epoch

            def die(epoch):
                if epoch == kill_at:
                    raise KeyboardInterrupt
                return orig(epoch)

            loop.train_epoch = die
        try:
            return loop.run(resume=resume)
        except KeyboardInterrupt:
            return None

    ds_run("full", 2)
    ds_run("killed", 2, kill_at=2)
    from transformers import GPTNeoForCausalLM

    resumed = GPTNeoForCausalLM.from_pretrained(os.path.join(out, "killed", "checkpoint", "model")).eval()
    ds_run("killed", 2, model=resumed, resume=True)
    ds_run("zero3", 3)
    npo = dict(method="npo", lw=0.5, kl=1.0)  # every input a method can ask for: ref log-probs, learn, p0
    ds_run("npo", 2, **npo)

    # Uneven flags: step 1 gives rank 0 two flagged samples and rank 1 one; step 2 gives rank 0
    # one and rank 1 none. Only the share weighting makes this the single-device update.
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(epoch_seed(SEED, 1))).tolist()
    flags = np.zeros(N, dtype=np.int64)
    flags[[perm[0], perm[2], perm[1], perm[4]]] = 1
    assert world == 2 and MICRO == 2, "the flag pattern above assumes 2 ranks x micro batch 2"
    uneven = {}
    for name, engine, batch in (("ds", DeepSpeedEngine(tiny_neo(), ds_config(2)), MICRO),
                                ("single", TorchEngine(tiny_neo(), LR, torch.device("cpu")), MICRO * world)):
        if name == "single" and rank != 0:
            continue
        loop = ds_loop(engine, os.path.join(out, "uneven"), data, thr, batch, tiny_neo())
        loop.state.flags = flags
        stats = loop.train_epoch(1)
        uneven[name] = {"stats": stats, "params": {k: v.detach().clone() for k, v in engine.unwrapped().state_dict().items()}}
    if rank == 0:
        torch.save(uneven, os.path.join(out, "uneven.pt"))
    if rank == 0:  # the single-device engine with the same effective batch
        d = os.path.join(out, "single")
        os.makedirs(d, exist_ok=True)
        model = tiny_neo()
        ds_loop(TorchEngine(model, LR, torch.device("cpu")), d, data, thr, MICRO * world, tiny_neo()).run()
        d = os.path.join(out, "npo_single")
        os.makedirs(d, exist_ok=True)
        ds_loop(TorchEngine(tiny_neo(), LR, torch.device("cpu")), d, data, thr, MICRO * world, tiny_neo(),
                **npo).run()
    from icu.engine import shutdown_distributed

    shutdown_distributed(barrier=True)


def llama_main() -> None:
    out = sys.argv[1]
    rank, _, world, device = init_deepspeed_distributed()
    data = family_pairs(gpt2_tokenizer(), N, 4, seed=3, tokenizer=tiny_llama_tokenizer())
    init = LossEval(0.0)(tiny_llama(), None, None, data.unlearn, indices=range(N)).per_sample["loss"]
    thr = float(init.max()) + 0.02
    for name, stage in (("llama_zero3", 3), ("llama_single", None)):
        if stage is None and rank != 0:
            continue
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        engine = (DeepSpeedEngine(tiny_llama(), ds_config(stage)) if stage
                  else TorchEngine(tiny_llama(), LR, torch.device("cpu")))
        ds_loop(engine, d, data, thr, MICRO if stage else MICRO * world, tiny_llama()).run()
    from icu.engine import shutdown_distributed

    shutdown_distributed(barrier=True)


if __name__ == "__main__":
    llama_main() if sys.argv[2:] == ["llama"] else main()
