"""The ICU loop on a tiny random GPT-Neo with a scripted (or loss-based) evaluator.

These tests pin the loop's own logic (loss, masking by flags, stop rule, guards, checkpoints);
the real forget-set evaluation is tested in test_forget_eval.py and end to end in
test_trainer_cli.py.
"""

from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from icu.checkpoint import load_state
from icu.losses import icu_loss, kl_term, lm_loss
from icu.loop import NonFiniteLoss, final_model_dir, stop_reason
from tiny import LEN, LossEval, ScriptedEval, make_loop, tiny_neo
from tiny import N_PAIRS as N


# --------------------------------------------------------------------------- loss terms


def test_loss_terms_match_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, -100, 4], [-100, 0, 3, 3]])
    ref_logits = torch.randn(2, 4, 5)
    p0 = torch.softmax(ref_logits, -1)
    # causal LM: position t predicts label t+1, ignored labels skipped, mean over the rest
    terms = []
    for b in range(2):
        for t in range(3):
            y = labels[b, t + 1].item()
            if y != -100:
                terms.append(-(logits[b, t, y] - torch.logsumexp(logits[b, t], 0)).item())
    assert lm_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    kl_terms = []
    for b in range(2):
        for t in range(4):
            q = torch.softmax(logits[b, t], 0)
            kl_terms.append(-sum(p0[b, t, v] * torch.log(q[v] + 1e-12) for v in range(5)).item())
    assert kl_term(logits, p0).item() == pytest.approx(sum(kl_terms) / len(kl_terms), rel=1e-6)
    # equals KL(p0||q) + H(p0): its minimum over q is at q = p0
    assert kl_term(ref_logits, p0).item() < kl_term(logits, p0).item()
    total = icu_loss(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0), uw=1.0, lw=0.5, kl=2.0)
    assert total.item() == pytest.approx(-2.0 + 1.5 + 10.0)


def test_train_epoch_uses_only_flagged_samples(tmp_path, pairs):
    """One batch holding all samples, two flagged: the update equals Adam on those two alone."""
    model = tiny_neo()
    manual = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    lp = make_loop(tmp_path, pairs, None, model=model)
    lp.cfg.batch_size = N
    lp.state.flags = np.array([0, 1, 0, 0, 1, 0])
    stats = lp.train_epoch(1)
    assert stats["steps"] == 1

    keep = torch.tensor([1, 4])
    u, l = pairs.unlearn, pairs.learn
    opt = torch.optim.Adam(manual.parameters(), lr=1e-3, betas=(0.9, 0.98))
    manual.train()
    ul = manual(input_ids=u.input_ids[keep], attention_mask=u.attention_mask[keep]).logits
    ll = manual(input_ids=l.input_ids[keep], attention_mask=l.attention_mask[keep]).logits
    with torch.no_grad():
        p0 = torch.softmax(ref(input_ids=l.input_ids[keep], attention_mask=l.attention_mask[keep]).logits, -1)
    loss = -1.0 * lm_loss(ul, u.labels[keep]) + 0.5 * lm_loss(ll, l.labels[keep]) + 1.0 * kl_term(ll, p0)
    loss.backward()
    opt.step()
    for (name, a), b in zip(model.named_parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_cached_kl_mode_equals_frozen_mode(tmp_path, pairs):
    outs = []
    for mode in ("frozen", "cached"):
        lp = make_loop(tmp_path / mode, pairs, None, kl_mode=mode)
        if mode == "cached":
            lp.build_kl_cache()
            assert lp.kl_cache.shape == (N, LEN, 50257)
        lp.state.flags = np.ones(N, dtype=np.int64)
        outs.append((lp.train_epoch(1), [p.detach().clone() for p in lp.engine.module.parameters()]))
    assert outs[0][0]["loss_kl"] == pytest.approx(outs[1][0]["loss_kl"], rel=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(a, b, atol=1e-7)


def test_autocast_runs_the_forwards_in_bf16_and_keeps_fp32_weights(tmp_path, pairs):
    """--autocast bf16: every forward of the step (trained model and KL reference) yields bf16
    logits, the loss terms are fp32, the weights stay fp32, and the step lands close to the fp32
    step (bf16 rounding only)."""
    outs = {}
    for mode in ("off", "bf16"):
        lp = make_loop(tmp_path / mode, pairs, None, autocast=mode)
        start = [p.detach().clone() for p in lp.engine.module.parameters()]
        seen = []
        for m in (lp.engine.module, lp.reference_model):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.logits.dtype))
        lp.state.flags = np.ones(N, dtype=np.int64)
        stats = lp.train_epoch(1)
        assert set(seen) == {torch.bfloat16 if mode == "bf16" else torch.float32}
        assert len(seen) == 3 * stats["steps"]  # forget, learn, reference per step
        params = [p.detach().clone() for p in lp.engine.module.parameters()]
        assert all(p.dtype == torch.float32 for p in params)
        outs[mode] = (stats, torch.cat([(p - s).flatten() for p, s in zip(params, start)]))  # the epoch's step
    for key in ("loss_unlearn", "loss_learn", "loss_kl"):
        assert outs["bf16"][0][key] == pytest.approx(outs["off"][0][key], rel=0.02)
    # How far the bf16 step lands from the fp32 step, relative to the step's length: rounding gave
    # 0.02 here; a wrong sign, a dropped term or an extra step gives ~0.5-2. (An absolute bound
    # cannot see it: Adam moves each weight by at most lr per step, 3e-3 in the epoch's 3 steps.)
    step_off, step_bf16 = outs["off"][1], outs["bf16"][1]
    gap = ((step_bf16 - step_off).norm() / step_off.norm()).item()
    assert 0 < gap < 0.1


# --------------------------------------------------------------------------- flags and stopping


def test_stop_rule():
    assert stop_reason(0.5, {"el_10": 0.01}, 3, acc=0.5994, el_thr=0.0499) is not None
    assert stop_reason(0.7, {"el_10": 0.01}, 3, acc=0.5994, el_thr=0.0499) is None
    assert stop_reason(0.5, {"el_10": 0.2}, 3, acc=0.5994, el_thr=0.0499) is None
    assert stop_reason(0.5, {"el_10": 0.2, "el_5": 0.04}, 3, 0.5994, 0.0499) is not None  # any EL_n
    assert "no sample" in stop_reason(0.9, {"el_10": 0.9}, 0, 0.5994, 0.0499)


def test_flags_follow_each_validation_and_run_stops_on_rule(tmp_path, pairs):
    hi, lo = [0.9] * N, [0.0] * N
    script = [
        {"F1": hi, "bleu": hi, "ma": 0.95, "el": 0.5},  # epoch 0: all flagged
        {"F1": [0.9, 0.1, 0.9, 0.1, 0.9, 0.1], "bleu": hi, "ma": 0.8, "el": 0.3},  # 3 left
        {"F1": [0.9, 0.9, 0.1, 0.1, 0.1, 0.1], "bleu": [0.5, 0.005, 0.5, 0.5, 0.5, 0.5], "ma": 0.7, "el": 0.2},
        {"F1": hi, "bleu": hi, "ma": 0.5, "el": 0.01},  # MA and EL below: stop
    ]
    seen = []
    lp = make_loop(tmp_path, pairs, ScriptedEval(script))
    orig = lp.train_epoch

    def spy(epoch):
        seen.append(np.flatnonzero(lp.state.flags).tolist())
        return orig(epoch)

    lp.train_epoch = spy
    summary = lp.run()
    assert summary["epochs"] == 3 and "MA 0.5000 <= 0.5994" in summary["stop_reason"]
    # flags are recomputed from scratch each time: sample 1 comes back at epoch 2 only via F1,
    # but its BLEU 0.005 < 0.01 keeps it out; sample 0 stays in
    assert seen == [[0, 1, 2, 3, 4, 5], [0, 2, 4], [0]]
    valid = pd.read_csv(tmp_path / "valid.csv")
    assert list(valid.columns) == ["epoch", "val_loss", "acc", "el_10"]
    assert valid["epoch"].tolist() == [0, 1, 2, 3] and valid["acc"].tolist() == pytest.approx([0.95, 0.8, 0.7, 0.5])
    hist = pd.read_csv(tmp_path / "history.csv")
    assert hist["flagged"].tolist() == [6, 3, 1, 6]
    assert list(pd.read_csv(tmp_path / "score.csv").columns) == ["epoch", "diff", "entropy", "bleu", "P", "R", "F1"]
    e1 = pd.read_csv(tmp_path / "epoch1.csv")
    assert list(e1.columns[:9]) == ["id", "diff", "entropy", "bleu", "P", "R", "F1", "candidate", "reference"]
    assert os.path.isdir(final_model_dir(lp.cfg, 3)) and summary["model_dir"].endswith("tiny_exp0_lr0.001_uw1.0_lw0.5_kl1.0_epoch3_updateboth")
    assert os.path.isfile(tmp_path / "metrics.png")


def test_no_flagged_sample_stops_before_training(tmp_path, pairs):
    lp = make_loop(tmp_path, pairs, ScriptedEval([{"F1": [0.0] * N, "bleu": [0.0] * N, "ma": 0.9, "el": 0.9}]))
    lp.train_epoch = lambda epoch: pytest.fail("must not train")
    summary = lp.run()
    assert summary["epochs"] == 0 and "no sample" in summary["stop_reason"]


def test_all_unflagged_batches_are_skipped(tmp_path, pairs):
    lp = make_loop(tmp_path, pairs, None)
    lp.cfg.batch_size = 1
    lp.state.flags = np.array([0, 0, 1, 0, 0, 0])
    stats = lp.train_epoch(1)
    assert stats["steps"] == 1 and stats["skipped_batches"] == 5
    assert np.isfinite(stats["loss_unlearn"])


def test_max_epochs(tmp_path, pairs):
    hi = [0.9] * N
    lp = make_loop(tmp_path, pairs, ScriptedEval([{"F1": hi, "bleu": hi, "ma": 0.95, "el": 0.5}]), max_epochs=2)
    summary = lp.run()
    assert summary["epochs"] == 2 and "--max_epochs 2" in summary["stop_reason"]
    assert len(pd.read_csv(tmp_path / "valid.csv")) == 3


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, pairs, monkeypatch):
    hi = [0.9] * N
    lp = make_loop(tmp_path, pairs, ScriptedEval([{"F1": hi, "bleu": hi, "ma": 0.95, "el": 0.5}]))
    before = {k: v.clone() for k, v in lp.engine.module.state_dict().items()}
    from icu.methods import icu as icu_method

    monkeypatch.setattr(icu_method, "lm_loss", lambda logits, labels: (logits.sum() * float("nan")))
    with pytest.raises(NonFiniteLoss, match="non-finite at epoch 1"):
        lp.run()
    state = load_state(os.path.join(tmp_path, "checkpoint"))
    assert state["epoch"] == 0
    from transformers import GPTNeoForCausalLM

    saved = GPTNeoForCausalLM.from_pretrained(os.path.join(tmp_path, "checkpoint", "model")).state_dict()
    for k, v in before.items():
        assert torch.equal(saved[k], v), k
    # the NaN step was never applied
    for k, v in lp.engine.module.state_dict().items():
        assert torch.isfinite(v).all(), k


# --------------------------------------------------------------------------- resume


def test_resume_matches_uninterrupted_run(tmp_path, pairs):
    from transformers import GPTNeoForCausalLM

    # flag = "loss still below the initial max + 0.03": gradient ascent unflags samples over time
    init = LossEval(thr=0.0)(tiny_neo(), None, None, pairs.unlearn, indices=range(N)).per_sample["loss"]
    thr = float(init.max()) + 0.03

    def fresh(d, model=None):
        return make_loop(d, pairs, LossEval(thr=thr), model=model, max_epochs=3, acc=0.0)

    full = fresh(tmp_path / "full")
    full_summary = full.run()

    killed = fresh(tmp_path / "killed")
    orig = killed.train_epoch

    def die_at_2(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return orig(epoch)

    killed.train_epoch = die_at_2
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    model = GPTNeoForCausalLM.from_pretrained(os.path.join(tmp_path, "killed", "checkpoint", "model")).eval()
    resumed = make_loop(tmp_path / "killed", pairs, LossEval(thr=thr), model=model, max_epochs=3, acc=0.0)
    resumed.reference_model = full.reference_model  # the original model, as the script reloads it
    res_summary = resumed.run(resume=True)

    assert res_summary["epochs"] == full_summary["epochs"] == 3
    a = pd.read_csv(tmp_path / "full" / "history.csv")
    b = pd.read_csv(tmp_path / "killed" / "history.csv")
    cols = ["epoch", "val_loss", "acc", "el_10", "flagged", "loss_unlearn", "loss_learn", "loss_kl"]
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-6)
    assert a["flagged"].tolist()[0] == N and a["flagged"].tolist()[-1] < N  # flags really moved
    for (name, p), q in zip(full.engine.module.named_parameters(), resumed.engine.module.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_plan_step_gives_each_rank_its_share_and_a_placeholder():
    """The engine's step bookkeeping on a fake two-rank engine (the other rank holds ``other`` rows)."""
    from icu.engine import Engine

    class TwoRanks(Engine):
        world_size = 2

        def __init__(self, other):
            self.other = other

        def all_reduce_sum(self, value):
            return value + self.other

    keep = torch.tensor([True, False, True])
    plan = TwoRanks(other=1).plan_step(keep)
    assert plan.keep is keep and plan.share == pytest.approx(2 / 3) and plan.scale == pytest.approx(4 / 3)
    plan = TwoRanks(other=3).plan_step(torch.zeros(3, dtype=torch.bool))
    assert plan.keep.tolist() == [True, False, False] and plan.share == 0.0 and plan.scale == 0.0
    assert TwoRanks(other=0).plan_step(torch.zeros(3, dtype=torch.bool)) is None
    one = Engine().plan_step(keep)  # one device: the loss is left as it is
    assert one.share == 1.0 and one.scale == 1.0


def _checkpoint_model(run_dir):
    from transformers import GPTNeoForCausalLM

    return GPTNeoForCausalLM.from_pretrained(os.path.join(run_dir, "checkpoint", "model")).eval()


def _loss_threshold(pairs):
    """Flag = loss below the initial max + 0.03: gradient ascent unflags samples over time."""
    init = LossEval(thr=0.0)(tiny_neo(), None, None, pairs.unlearn, indices=range(N)).per_sample["loss"]
    return float(init.max()) + 0.03


def _assert_same_run(a_dir, b_dir, a_loop, b_loop):
    cols = ["epoch", "val_loss", "acc", "el_10", "flagged", "loss_unlearn", "loss_learn", "loss_kl"]
    a = pd.read_csv(os.path.join(a_dir, "history.csv"))
    b = pd.read_csv(os.path.join(b_dir, "history.csv"))
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-6)
    for (name, p), q in zip(a_loop.engine.module.named_parameters(), b_loop.engine.module.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


# The checkpoint swap: kill points and the epoch --resume must continue from (the epoch-2 save
# of a 3-epoch run is interrupted). "write": inside the engine's write of checkpoint.tmp.
KILL_POINTS = [("write", 1), pytest.param("before first rename", 2, marks=pytest.mark.slow),
               ("before second rename", 2), pytest.param("before removing old", 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("kill_at, resume_epoch", KILL_POINTS)
def test_kill_during_checkpoint_swap_resumes_from_newest_complete(tmp_path, pairs, monkeypatch, kill_at, resume_epoch):
    from icu import checkpoint as ckpt_mod

    thr = _loss_threshold(pairs)
    full = make_loop(tmp_path / "full", pairs, LossEval(thr), max_epochs=3, acc=0.0)
    full.run()

    killed = make_loop(tmp_path / "killed", pairs, LossEval(thr), max_epochs=3, acc=0.0)
    real_rename, real_remove, real_save_state = ckpt_mod._rename, ckpt_mod.remove_checkpoint, killed.engine.save_state
    calls = {"rename": 0}

    def armed():
        return killed.state.epoch == 2

    def rename(src, dst):
        if armed():
            calls["rename"] += 1
            if (kill_at, calls["rename"]) in (("before first rename", 1), ("before second rename", 2)):
                raise KeyboardInterrupt
        real_rename(src, dst)

    def remove(path):
        if armed() and kill_at == "before removing old" and path.endswith(".old") and calls["rename"] == 2:
            raise KeyboardInterrupt
        real_remove(path)

    def save_state(directory):
        real_save_state(directory)
        if armed() and kill_at == "write":
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "_rename", rename)
    monkeypatch.setattr(ckpt_mod, "remove_checkpoint", remove)
    killed.engine.save_state = save_state
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    monkeypatch.undo()
    run_dir = str(tmp_path / "killed")
    stranded = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint"))
    assert len(stranded) >= (1 if kill_at == "before removing old" else 2), stranded

    assert ckpt_mod.recover_checkpoint(run_dir) == resume_epoch
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint")) == ["checkpoint"]
    resumed = make_loop(run_dir, pairs, LossEval(thr), model=_checkpoint_model(run_dir), max_epochs=3, acc=0.0)
    resumed.reference_model = full.reference_model  # the original model, as the script reloads it
    assert resumed.run(resume=True)["epochs"] == 3
    assert resumed.resume_note["resumed_from_epoch"] == resume_epoch
    _assert_same_run(tmp_path / "full", run_dir, full, resumed)


def test_partial_checkpoint_is_never_chosen(tmp_path):
    from icu.checkpoint import MARKER, find_checkpoint

    for name, epoch in (("checkpoint", 3), ("checkpoint.tmp", 4), ("checkpoint.old", 2)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / MARKER).write_text(f'{{"epoch": {epoch}}}')
    assert find_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoint.tmp"), 4)
    os.remove(tmp_path / "checkpoint.tmp" / MARKER)  # a write that never finished
    assert find_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoint"), 3)
    (tmp_path / "checkpoint" / MARKER).write_text("{garbled")
    assert find_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoint.old"), 2)


def test_lower_lr_on_resume_applies_after_non_finite_loss(tmp_path, pairs, monkeypatch):
    """The non-finite-loss advice ("lower --lr, then --resume") works: the new lr reaches the
    restored optimizer, and the run equals one started with that lr (the epoch-0 checkpoint
    holds no Adam steps yet)."""
    hi = [0.9] * N
    script = [{"F1": hi, "bleu": hi, "ma": 0.95, "el": 0.5}]
    from icu.methods import icu as icu_method

    real_lm_loss = icu_method.lm_loss
    current = {}

    def blows_up_at_high_lr(logits, labels):  # stands in for a divergence at too high an lr
        loss = real_lm_loss(logits, labels)
        return loss * float("nan") if current["loop"].engine.optimizer.param_groups[0]["lr"] > 0.1 else loss

    monkeypatch.setattr(icu_method, "lm_loss", blows_up_at_high_lr)
    current["loop"] = failed = make_loop(tmp_path / "run", pairs, ScriptedEval(script), lr=1.0, max_epochs=2)
    with pytest.raises(NonFiniteLoss):
        failed.run()
    current["loop"] = resumed = make_loop(tmp_path / "run", pairs, ScriptedEval(script), lr=1e-3, max_epochs=2,
                                          model=_checkpoint_model(tmp_path / "run"))
    resumed.reference_model = failed.reference_model
    assert resumed.run(resume=True)["epochs"] == 2
    assert resumed.engine.optimizer.param_groups[0]["lr"] == 1e-3
    assert resumed.resume_note["lr_changed"] == {"from": 1.0, "to": 1e-3, "at_epoch": 0}
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "finished" and run["lr_changed"]["to"] == 1e-3 and run["resumed_from_epoch"] == 0
    current["loop"] = fresh = make_loop(tmp_path / "fresh", pairs, ScriptedEval(script), lr=1e-3, max_epochs=2)
    fresh.run()
    _assert_same_run(tmp_path / "fresh", tmp_path / "run", fresh, resumed)


@pytest.mark.parametrize("changed, message", [
    ({"uw": 2.0}, "--uw 2.0 differs from the checkpoint's --uw 1.0"),
    ({"el_ns": (5, 10)}, "--el_n 5,10 differs from the checkpoint's --el_n 10"),
    ({"batch_size": 3}, "--batch_size 3 differs"),
    ({"autocast": "bf16"}, "--autocast bf16 differs from the checkpoint's --autocast off"),
])
def test_resume_refuses_settings_that_change_results(tmp_path, pairs, changed, message):
    from icu.errors import IcuError

    hi = [0.9] * N
    script = [{"F1": hi, "bleu": hi, "ma": 0.95, "el": 0.5}]
    make_loop(tmp_path, pairs, ScriptedEval(script), max_epochs=1).run()
    before = (tmp_path / "run.json").read_text()
    lp = make_loop(tmp_path, pairs, ScriptedEval(script), max_epochs=2, model=_checkpoint_model(tmp_path))
    for key, value in changed.items():
        setattr(lp.cfg, key, value)
    with pytest.raises(IcuError, match=re.escape(message)):
        lp.run(resume=True)
    assert (tmp_path / "run.json").read_text() == before  # a refused resume writes nothing
    # the same settings with a larger --max_epochs continue the run
    lp = make_loop(tmp_path, pairs, ScriptedEval(script), max_epochs=2, model=_checkpoint_model(tmp_path))
    assert lp.run(resume=True)["epochs"] == 2


def test_resume_config_check_skips_keys_one_side_lacks():
    from icu.checkpoint import check_resume_config
    from icu.errors import IcuError

    check_resume_config({"uw": 1.0, "lr": 1.0}, {"uw": 1.0, "lr": 0.1, "method": "npo"})  # lr may change
    with pytest.raises(IcuError, match="--method npo differs from the checkpoint's --method icu"):
        check_resume_config({"method": "icu"}, {"method": "npo"})


def test_nothing_to_forget_saves_no_copy_and_says_so(tmp_path, pairs):
    lp = make_loop(tmp_path, pairs, ScriptedEval([{"F1": [0.9] * N, "bleu": [0.9] * N, "ma": 0.1, "el": 0.01}]))
    lp.train_epoch = lambda epoch: pytest.fail("must not train")
    summary = lp.run()
    assert summary["nothing_to_forget"] and summary["model_dir"] is None and summary["epochs"] == 0
    assert not [n for n in os.listdir(tmp_path) if n.endswith("_updateboth")]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["nothing_to_forget"] is True and run["status"] == "finished" and "MA 0.1000" in run["stop_reason"]
