"""Run by tests/test_deepspeed_loop.py under ``torchrun --nproc_per_node 2`` (not a test module).

Drives ICULoop through DeepSpeedEngine on a tiny random GPT-Neo with a weights-dependent stand-in
evaluator, so the multi-rank logic (sampler, loss weighting, sharded validation, checkpoints,
ZeRO-3 gathering) is checked in seconds. Each run writes its usual files under ``OUT/<name>``:

    full     DeepSpeed ZeRO-2, uninterrupted
    killed   DeepSpeed ZeRO-2, interrupted before epoch 2, then resumed from its checkpoint
    zero3    DeepSpeed ZeRO-3, uninterrupted
    single   TorchEngine on rank 0 with batch B x W (the single-device trainer's engine)
    npo, npo_single   the same pair of runs for a non-ICU method (NPO with learn and KL terms)

and ``OUT/thr.json`` (the evaluator's threshold), ``OUT/uneven.pt`` (one epoch with flags that
leave the ranks different numbers of samples: DeepSpeed vs single-device weights and losses).
The test compares the files.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from icu.data import PairedDataset, encode_rows  # noqa: E402
from icu.ds_config import reconcile_ds_config  # noqa: E402
from icu.engine import DeepSpeedEngine, TorchEngine, epoch_seed, init_deepspeed_distributed  # noqa: E402
from icu.losses import lm_loss  # noqa: E402
from icu.loop import ICULoop, LoopConfig  # noqa: E402
from icu.toy import tiny_neo_config  # noqa: E402

N = 8  # pairs
LEN = 24  # tokens per sample
MICRO = 2  # batch per rank
LR = 1e-3
EPOCHS = 3
SEED = 42  # LoopConfig's default


class LossFlagEval:
    """Flag = per-sample LM loss below ``thr`` (gradient ascent unflags samples over time);
    MA = EL = exp(-loss). Deterministic and cheap, and it depends on the weights."""

    def __init__(self, thr: float):
        self.thr = thr

    @torch.no_grad()
    def __call__(self, model, tok, gpt2, data, *, indices, **kw):
        idx = list(indices)
        losses = np.asarray([
            lm_loss(model(input_ids=data.input_ids[i : i + 1].to(model.device)).logits, data.labels[i : i + 1].to(model.device)).item()
            for i in idx
        ])
        flag = (losses < self.thr).astype(np.int64)
        df = pd.DataFrame({
            "id": data.doc_ids[idx].numpy(), "prefix": "p", "reference": "r", "candidate": "c",
            "bleu": flag.astype(float), "P": flag.astype(float), "R": flag.astype(float), "F1": flag.astype(float),
            "diff": 1.0, "entropy": 1.0, "ma": np.exp(-losses), "el_10": np.exp(-losses), "loss": losses,
        })
        return SimpleNamespace(per_sample=df, flags=flag, loss_sum=float(losses.sum()), loss_batches=len(idx))


def pairs() -> PairedDataset:
    from icu.models import builtin_gpt2_tokenizer
    from icu.toytext import generate_families

    tok = builtin_gpt2_tokenizer()
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    docs = generate_families(2 * N, 4, seed=3, sentences_per_doc=18)
    rows = np.asarray([tok(t)["input_ids"][:200] for _, t in docs], dtype=np.uint16)
    enc = lambda r, ids: encode_rows(r, ids, tok, tok, prefix_length=LEN, suffix_length=LEN)
    return PairedDataset(enc(rows[:N], range(N)), enc(rows[N:], range(N, 2 * N)))


def tiny_model():
    from transformers import GPTNeoForCausalLM

    torch.manual_seed(0)
    return GPTNeoForCausalLM(tiny_neo_config(hidden_size=16, num_layers=1, num_heads=2)).eval()


def ds_config(stage: int, micro: int = MICRO) -> dict:
    """A minimal JSON through the trainer's reconciliation (fp32, torch Adam, no clipping)."""
    raw = {"zero_optimization": {"stage": stage}, "optimizer": {"type": "Adam", "params": {"lr": 0.5}}}
    return reconcile_ds_config(raw, lr=LR, batch_size=micro, world_size=int(os.environ["WORLD_SIZE"]),
                               on_cpu=True).config


def make_loop(engine, out: str, data, thr: float, batch_size: int, model_for_ref, **cfg_kw) -> ICULoop:
    cfg = LoopConfig(exp="exp0", model_name="tiny", dir=out, lr=LR, batch_size=batch_size,
                     eval_batch_size=3, target_length=LEN, max_epochs=EPOCHS, acc=0.0, **cfg_kw)
    ref = copy.deepcopy(model_for_ref).requires_grad_(False)
    return ICULoop(engine, cfg, tokenizer=None, gpt2_tokenizer=None, dataset=data, reference_model=ref,
                   scorer=None, evaluator=LossFlagEval(thr))


def main() -> None:
    out = sys.argv[1]
    rank, _, world, device = init_deepspeed_distributed()
    data = pairs()
    init = LossFlagEval(0.0)(tiny_model(), None, None, data.unlearn, indices=range(N)).per_sample["loss"]
    thr = float(init.max()) + 0.02  # all flagged at epoch 0; ascent unflags them one by one
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "thr.json"), "w") as fh:
            json.dump({"thr": thr, "world_size": world}, fh)

    def ds_run(name: str, stage: int, model=None, resume: bool = False, kill_at: int = 0, **cfg_kw):
        model = model or tiny_model()
        original = tiny_model()  # the KL target is always the original model
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        loop = make_loop(DeepSpeedEngine(model, ds_config(stage)), d, data, thr, MICRO, original, **cfg_kw)
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
    for name, engine, batch in (("ds", DeepSpeedEngine(tiny_model(), ds_config(2)), MICRO),
                                ("single", TorchEngine(tiny_model(), LR, torch.device("cpu")), MICRO * world)):
        if name == "single" and rank != 0:
            continue
        loop = make_loop(engine, os.path.join(out, "uneven"), data, thr, batch, tiny_model())
        loop.state.flags = flags
        stats = loop.train_epoch(1)
        uneven[name] = {"stats": stats, "params": {k: v.detach().clone() for k, v in engine.unwrapped().state_dict().items()}}
    if rank == 0:
        torch.save(uneven, os.path.join(out, "uneven.pt"))
    if rank == 0:  # the single-device engine with the same effective batch
        d = os.path.join(out, "single")
        os.makedirs(d, exist_ok=True)
        model = tiny_model()
        make_loop(TorchEngine(model, LR, torch.device("cpu")), d, data, thr, MICRO * world, tiny_model()).run()
        d = os.path.join(out, "npo_single")
        os.makedirs(d, exist_ok=True)
        make_loop(TorchEngine(tiny_model(), LR, torch.device("cpu")), d, data, thr, MICRO * world, tiny_model(),
                  **npo).run()
    from icu.engine import shutdown_distributed

    shutdown_distributed(barrier=True)


if __name__ == "__main__":
    main()
