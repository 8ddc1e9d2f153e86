"""The DeepSpeed path's single-process parts: config loading/validation/reconciliation, the
shipped config/*.json, the data-parallel sampler, and sharded validation (simulated ranks).
None of these start DeepSpeed; the multi-rank runs are in test_deepspeed_multirank.py."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from icu.ds_config import build_ds_config, load_ds_config, reconcile_ds_config, validate_ds_config
from icu.engine import DeepSpeedEngine, Engine, TorchEngine, epoch_seed
from icu.errors import IcuError
from icu.loop import shard_indices
from conftest import REPO
from tiny import make_loop


def rec(cfg: dict, **kw):
    args = dict(lr=5e-6, batch_size=1, world_size=3, on_cpu=False)
    args.update(kw)
    return reconcile_ds_config(cfg, **args)


# --------------------------------------------------------------------------- loading


def test_missing_file(tmp_path):
    with pytest.raises(IcuError, match="not found"):
        load_ds_config(str(tmp_path / "nope.json"))


@pytest.mark.parametrize("text, match", [
    ("{\"train_batch_size\": 3,", "not valid JSON \\(line 1"),
    ("", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_not_json(tmp_path, text, match):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(IcuError, match=match):
        load_ds_config(str(p))


def test_binary_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(IcuError, match="bad.json"):
        load_ds_config(str(p))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("zero, match", [
    ({"stage": 4}, "stage must be 0, 1, 2 or 3 \\(got 4\\)"),
    ({"stage": "2"}, "stage must be 0, 1, 2 or 3"),
    ({"stage": -1}, "stage must be 0, 1, 2 or 3"),
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "offload_optimizer needs ZeRO stage 1, 2 or 3"),
    ({"stage": 0, "cpu_offload": True}, "offload_optimizer needs ZeRO stage"),
    ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param needs ZeRO stage 3, but .* is 2"),
    ({"stage": 2, "offload_optimizer": {"device": "gpu"}}, "device must be one of none, cpu, nvme"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, "nvme but sets no nvme_path"),
    ([2], "zero_optimization must be an object"),
])
def test_bad_zero_sections(zero, match):
    with pytest.raises(IcuError, match=match):
        validate_ds_config({"zero_optimization": zero}, "x.json")


def test_good_zero_sections():
    assert validate_ds_config({}) == 0
    assert validate_ds_config({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}) == 1
    assert validate_ds_config({"zero_optimization": {"stage": 2, "offload_param": {"device": "none"}}}) == 2
    assert validate_ds_config({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}) == 3


@pytest.mark.parametrize("cfg, match", [
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
    ({"optimizer": {"type": "SGD", "params": {}}}, "optimizer type 'SGD'.*use \"type\": \"Adam\""),
    ({"scheduler": {"type": "WarmupLR"}}, "remove \"scheduler\""),
    ({"train_batch_size": 0}, "train_batch_size must be a positive integer"),
    ({"train_micro_batch_size_per_gpu": 1.5}, "must be a positive integer"),
    ({"gradient_accumulation_steps": "two"}, "must be a positive integer"),
])
def test_bad_other_sections(cfg, match):
    with pytest.raises(IcuError, match=match):
        validate_ds_config(cfg, "x.json")


# --------------------------------------------------------------------------- reconciliation


def test_flags_win_over_json_and_notes_say_so():
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 2e-6}}}
    r = rec(cfg, lr=5e-6, batch_size=2, world_size=3)
    c = r.config
    assert c["optimizer"]["params"]["lr"] == 5e-6
    assert c["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert c["optimizer"]["params"]["weight_decay"] == 0.0
    assert c["optimizer"]["params"]["adam_w_mode"] is False
    assert "torch_adam" not in c["optimizer"]["params"]  # GPU runs keep DeepSpeed's fused Adam
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (2, 1, 6)
    assert c["gradient_clipping"] == 0.0  # DeepSpeed 0.19 would clip to 1.0
    notes = " ".join(r.notes)
    assert "lr 2e-06 replaced by --lr 5e-06" in notes and "replaced by --batch_size 2" in notes
    assert cfg["optimizer"]["params"]["lr"] == 2e-6  # the input is not modified


def test_empty_config_gets_icu_defaults():
    r = rec({}, lr=1e-4, batch_size=8, world_size=2, on_cpu=True)
    c = r.config
    assert c["optimizer"] == {"type": "Adam", "params": {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-8,
                                                          "weight_decay": 0.0, "adam_w_mode": False,
                                                          "torch_adam": True}}
    assert c["train_batch_size"] == 16 and r.zero_stage == 0 and r.precision == "fp32"
    assert any("torch.optim.Adam" in n for n in r.notes)


def test_gradient_accumulation_given():
    c = rec({"gradient_accumulation_steps": 4}, batch_size=2, world_size=3).config
    assert c["train_batch_size"] == 24
    c = rec({"gradient_accumulation_steps": 2, "train_batch_size": 12}, batch_size=2, world_size=3).config
    assert c["train_batch_size"] == 12


def test_auto_batch_keys_are_computed():
    c = rec({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}, batch_size=2, world_size=2).config
    assert (c["train_micro_batch_size_per_gpu"], c["train_batch_size"]) == (2, 4)


def test_world_size_that_does_not_divide_the_fixed_batch():
    with pytest.raises(IcuError, match="train_batch_size 3 cannot be split over 2 ranks.*run on 3 ranks"):
        rec({"train_batch_size": 3}, batch_size=1, world_size=2)


def test_fixed_batch_that_needs_accumulation_says_what_to_set():
    with pytest.raises(IcuError, match="\"gradient_accumulation_steps\": 3.*--batch_size 3"):
        rec({"train_batch_size": 3}, batch_size=1, world_size=1)


def test_fixed_batch_against_batch_size_flag():
    with pytest.raises(IcuError, match="set train_batch_size to 24 \\(or remove it\\)"):
        rec({"train_batch_size": 3}, batch_size=8, world_size=3)


def test_inconsistent_accumulation():
    with pytest.raises(IcuError, match="gradient_accumulation_steps 2 = 12"):
        rec({"train_batch_size": 18, "gradient_accumulation_steps": 2}, batch_size=2, world_size=3)


def test_betas_and_clipping_from_json_are_kept_with_a_note():
    r = rec({"optimizer": {"params": {"betas": [0.9, 0.999]}}, "gradient_clipping": 1.0})
    assert r.config["optimizer"]["params"]["betas"] == [0.9, 0.999] and r.config["gradient_clipping"] == 1.0
    assert any("betas" in n for n in r.notes) and any("gradient_clipping 1.0 kept" in n for n in r.notes)


def test_precision_rules():
    r = rec({"bf16": {"enabled": True}}, on_cpu=True)
    assert r.precision == "bf16" and any("bf16 kept on CPU" in n for n in r.notes)
    with pytest.raises(IcuError, match="fp16 training is not supported on CPU"):
        rec({"fp16": {"enabled": True}}, on_cpu=True)
    with pytest.raises(IcuError, match="--dtype bf16 but .* trains in fp32"):
        rec({}, model_dtype="bf16")
    assert rec({"bf16": {"enabled": True}}, model_dtype="bf16").precision == "bf16"


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name, world, stage", [
    ("deepspeed1.json", 1, 2), ("deepspeed3.json", 3, 2), ("deepspeed6.json", 6, 2), ("deepspeed_zero3.json", 4, 3),
])
def test_shipped_configs(name, world, stage):
    path = os.path.join(REPO, "config", name)
    r = build_ds_config(path, lr=2e-6, batch_size=1, world_size=world, on_cpu=False)
    c = r.config
    assert r.zero_stage == stage and r.precision == "bf16"
    assert c["train_batch_size"] == world and c["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert c["optimizer"]["params"]["lr"] == 2e-6 and c["gradient_clipping"] == 0.0
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert not r.notes  # the shipped files agree with the flags the scripts pass


def test_paper_config_on_the_wrong_world_size_is_a_clear_error():
    with pytest.raises(IcuError, match="deepspeed3.json: train_batch_size 3 cannot be split over 2 ranks"):
        build_ds_config(os.path.join(REPO, "config", "deepspeed3.json"), lr=2e-6, batch_size=1, world_size=2,
                        on_cpu=False)


def test_scripts_pass_the_configs_their_gpu_count_needs():
    for script, gpus, cfg in (("train-1_3b.sh", 3, "deepspeed3.json"), ("train-2_7b.sh", 6, "deepspeed6.json")):
        text = open(os.path.join(REPO, "scripts", script)).read()
        assert f"--num_gpus {gpus} train_neo_meanwhile_update_deepspeed.py" in text
        assert f"config/{cfg}" in text and "--batch_size 1" in text


# --------------------------------------------------------------------------- data parallel sampler


def fake_ds_engine(rank: int, world: int) -> DeepSpeedEngine:
    eng = DeepSpeedEngine.__new__(DeepSpeedEngine)  # the sampler needs only rank and world size
    eng.rank, eng.world_size = rank, world
    return eng


@pytest.mark.parametrize("world, micro", [(2, 2), (3, 1), (4, 3)])
def test_rank_batches_together_are_the_single_device_batches(world, micro):
    n = 24
    data = list(range(n))
    single_order = list(TorchEngine.sampler(None, data, seed=42, epoch=5))
    step = micro * world
    single_batches = [set(single_order[i : i + step]) for i in range(0, n, step)]
    per_rank = [list(fake_ds_engine(r, world).sampler(data, seed=42, epoch=5)) for r in range(world)]
    ds_batches = [
        set().union(*(set(per_rank[r][k * micro : (k + 1) * micro]) for r in range(world)))
        for k in range(len(single_batches))
    ]
    assert ds_batches == single_batches
    assert epoch_seed(42, 5) == 42 * 100003 + 5  # TorchEngine's seed, unchanged


# --------------------------------------------------------------------------- sharded validation


def test_shard_indices_cover_whole_batches():
    for n, b, w in [(10, 3, 2), (8, 8, 2), (7, 2, 3), (1, 4, 3), (32, 8, 3)]:
        shards = [shard_indices(n, b, r, w) for r in range(w)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        for r, s in enumerate(shards):
            batches = {i // b for i in s}
            assert all(k % w == r for k in batches)  # whole batches b = r, r+w, ...
    assert shard_indices(8, 8, 1, 2) == []  # fewer batches than ranks: rank 1 has none


class BatchEval:
    """Per-sample scores depend only on the sample; the loss of a batch on its composition, so
    val_loss matches only when the shards hold the single device's batches."""

    def __init__(self, f1):
        self.f1s = np.asarray(f1, float)

    def __call__(self, model, tok, gpt2, data, *, indices, batch_size, f1, bleu, **kw):
        idx = list(indices)
        assert idx, "the loop must not call the evaluator with no rows"
        f = self.f1s[idx]
        df = pd.DataFrame({"id": idx, "prefix": "p", "reference": "r", "candidate": "c", "bleu": 0.5, "P": f,
                           "R": f, "F1": f, "diff": 1.0, "entropy": 1.0, "ma": f / 2, "el_10": f / 3, "loss": f})
        batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        loss_sum = sum(float(np.max(self.f1s[b]) + len(b)) for b in batches)
        return SimpleNamespace(per_sample=df, flags=((f >= f1) & (0.5 >= bleu)).astype(np.int64),
                               loss_sum=loss_sum, loss_batches=len(batches))


class ThreadRank(Engine):
    """One rank of a world simulated with threads: all_gather_object is a real exchange."""

    def __init__(self, rank, world, slots, barrier):
        self.rank, self.world_size, self.slots, self.sync = rank, world, slots, barrier
        self.device = torch.device("cpu")

    def unwrapped(self):
        return None

    def all_gather_object(self, obj):
        self.slots[self.rank] = obj
        self.sync.wait()
        out = list(self.slots)
        self.sync.wait()  # nobody overwrites a slot before everyone has read them all
        return out


def simulated_validation(n, world, eval_batch, f1s):
    """Validate on ``world`` simulated ranks; every rank's result."""
    import threading

    data = SimpleNamespace(unlearn=list(range(n)))
    slots, sync = [None] * world, threading.Barrier(world, timeout=30)
    results, errors = [None] * world, []

    def rank_main(rank):
        try:
            lp = make_loop("unused", data, BatchEval(f1s), engine=ThreadRank(rank, world, slots, sync),
                           eval_batch_size=eval_batch)
            results[rank] = lp.validate(0)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)
            sync.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("n, world, eval_batch", [(11, 2, 3), (8, 3, 2), (4, 3, 4), (5, 4, 1)])
def test_sharded_validation_equals_unsharded(n, world, eval_batch):
    f1s = np.linspace(0.1, 0.6, n)[np.random.default_rng(n).permutation(n)]
    (one,) = simulated_validation(n, 1, eval_batch, f1s)
    assert one.per_sample["id"].tolist() == list(range(n))  # gathered back in row order
    assert 0 < one.flags.sum() < n
    for many in simulated_validation(n, world, eval_batch, f1s):  # every rank decides alike
        pd.testing.assert_frame_equal(one.per_sample, many.per_sample)
        assert one.flags.tolist() == many.flags.tolist()
        assert one.val_loss == many.val_loss and one.ma == many.ma and one.el == many.el
