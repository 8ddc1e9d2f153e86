"""The method registry: each method's loss against a hand computation, what each method makes
the loop compute, --refine off, the ICU regression against the pre-registry step, and the
trainer's --method flags (unknown name, ignored hyper-parameters, folder name, no frozen model).
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from icu.engine import epoch_seed
from icu.losses import icu_loss, kl_term, lm_loss
from icu.loop import final_model_dir, is_final_model_dir
from icu.methods import HYPERPARAMETERS, METHOD_NAMES, Method, StepBatch, get_method
from conftest import OFFLINE
from tiny import ScriptedEval, make_loop, tiny_neo
from tiny import N_PAIRS as N

HP = SimpleNamespace(uw=0.7, lw=0.3, kl=1.5, beta=0.4, gamma=0.2)


# --------------------------------------------------------------------------- hand computations


def token_logprobs(model, ids, mask, labels) -> list[list[torch.Tensor]]:
    """Per sample, the log-probability of each scored token, one position at a time."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    out = []
    for i in range(ids.shape[0]):
        row = []
        for t in range(ids.shape[1] - 1):
            y = int(labels[i, t + 1])
            if y != -100:
                row.append(torch.log_softmax(logits[i, t].float(), -1)[y])
        out.append(row)
    return out


def hand_nll(model, ids, mask, labels) -> float:
    """Mean NLL over every scored token of the batch (the samples' tokens pooled)."""
    lps = [lp for row in token_logprobs(model, ids, mask, labels) for lp in row]
    return -sum(lp.item() for lp in lps) / len(lps)


def hand_ce(model, ref, ids, mask) -> float:
    """Mean over samples and positions of -sum_v p0(v) log(q(v) + 1e-12)."""
    q = torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    p0 = torch.softmax(ref(input_ids=ids, attention_mask=mask).logits.float(), -1)
    vals = [-(p0[i, t] * torch.log(q[i, t] + 1e-12)).sum().item()
            for i in range(ids.shape[0]) for t in range(ids.shape[1])]
    return sum(vals) / len(vals)


def hand_seq_logprob(model, ids, mask, labels) -> list[tuple[float, int]]:
    """(log pi(y|x), |y|) per sample."""
    return [(sum(lp.item() for lp in row), len(row)) for row in token_logprobs(model, ids, mask, labels)]


def perturbed(model, seed=7, scale=0.05):
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return ref.eval().requires_grad_(False)


def make_step(model, ref, data, rows, method, hp) -> StepBatch:
    u, l = data.unlearn, data.learn
    t = {"unlearn_input_ids": u.input_ids[rows], "unlearn_attention_mask": u.attention_mask[rows],
         "unlearn_labels": u.labels[rows], "learn_input_ids": l.input_ids[rows],
         "learn_attention_mask": l.attention_mask[rows], "learn_labels": l.labels[rows]}
    fwd = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits
    ref_fwd = lambda ids, mask: ref(input_ids=ids, attention_mask=mask).logits
    p0 = lambda: torch.softmax(ref_fwd(t["learn_input_ids"], t["learn_attention_mask"]).float(), -1)
    return StepBatch(t, fwd, learn_allowed=method.needs_learn(hp), reference=ref_fwd, reference_learn_probs=p0)


def expected_loss(name, model, ref, data, rows, hp) -> float:
    u, l = data.unlearn, data.learn
    f = (u.input_ids[rows], u.attention_mask[rows])
    g = (l.input_ids[rows], l.attention_mask[rows])
    nll_target = hand_nll(model, *f, u.labels[rows])
    nll_mismatch = hand_nll(model, *f, l.labels[rows])  # target input, learn tokens as labels
    nll_learn = hand_nll(model, *g, l.labels[rows])
    ce = hand_ce(model, ref, *g)
    if name == "icu":
        return -hp.uw * nll_target + hp.lw * nll_learn + hp.kl * ce
    if name == "ga":
        return -hp.uw * nll_target
    if name == "kl":
        return -hp.uw * nll_target + hp.kl * ce
    if name == "llmu":
        return -hp.uw * nll_target + hp.lw * nll_mismatch + hp.kl * ce
    if name == "po":
        return nll_mismatch + hp.lw * nll_learn
    if name == "npo":
        cur = hand_seq_logprob(model, *f, u.labels[rows])
        old = hand_seq_logprob(ref, *f, u.labels[rows])
        npo = np.mean([(2 / hp.beta) * math.log1p(math.exp(hp.beta * (c - o))) for (c, _), (o, _) in zip(cur, old)])
        return npo + hp.lw * nll_learn + hp.kl * ce
    if name == "simnpo":
        cur = hand_seq_logprob(model, *f, u.labels[rows])
        sig = lambda x: 1 / (1 + math.exp(-x))
        sim = np.mean([-(2 / hp.beta) * math.log(sig(-(hp.beta / n) * lp - hp.gamma)) for lp, n in cur])
        return sim + hp.lw * nll_learn
    raise AssertionError(name)


def test_registry_lists_every_method():
    assert METHOD_NAMES == ("icu", "ga", "kl", "llmu", "po", "npo", "simnpo")
    for name in METHOD_NAMES:
        m = get_method(name)
        assert isinstance(m, Method) and m.name == name and set(m.uses) <= set(HYPERPARAMETERS)
    from icu.errors import IcuError

    with pytest.raises(IcuError, match="choose one of: icu, ga, kl, llmu, po, npo, simnpo"):
        get_method("dpo")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_matches_hand_computation(name, pairs):
    torch.manual_seed(0)
    model = tiny_neo()
    ref = perturbed(model)  # the frozen model differs, so NPO's ratio is not 1 and KL is not at its minimum
    rows = torch.tensor([1, 4])
    method = get_method(name)
    loss, terms = method.loss(make_step(model, ref, pairs, rows, method, HP), HP)
    assert set(terms) <= set(method.terms)
    assert loss.item() == pytest.approx(expected_loss(name, model, ref, pairs, rows, HP), rel=1e-5, abs=1e-6)
    loss.backward()  # differentiable with respect to the trained model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_npo_at_the_reference_is_2_log2_over_beta_and_falls_as_the_likelihood_drops(pairs):
    model = tiny_neo()
    rows = torch.tensor([0, 2, 3])
    hp = SimpleNamespace(uw=1.0, lw=0.0, kl=0.0, beta=0.1, gamma=0.0)
    npo = get_method("npo")
    same = npo.loss(make_step(model, copy.deepcopy(model).eval(), pairs, rows, npo, hp), hp)[0]
    assert same.item() == pytest.approx(2 * math.log(2) / 0.1, rel=1e-5)  # log ratio 0
    loss, _ = npo.loss(make_step(model, perturbed(model), pairs, rows, npo, hp), hp)
    loss.backward()
    # a gradient step on NPO lowers the targets' likelihood (as ascent does)
    before = lm_loss(model(input_ids=pairs.unlearn.input_ids[rows]).logits, pairs.unlearn.labels[rows]).item()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
    after = lm_loss(model(input_ids=pairs.unlearn.input_ids[rows]).logits, pairs.unlearn.labels[rows]).item()
    assert after > before


def test_needs_follow_the_weights():
    hp = lambda **kw: SimpleNamespace(**{**dict(uw=1.0, lw=0.5, kl=1.0, beta=0.1, gamma=0.0), **kw})
    ref = {n: get_method(n).needs_reference(hp()) for n in METHOD_NAMES}
    assert ref == {"icu": True, "ga": False, "kl": True, "llmu": True, "po": False, "npo": True, "simnpo": False}
    assert not get_method("icu").needs_reference(hp(kl=0.0))
    learn = {n: get_method(n).needs_learn(hp(lw=0.0, kl=0.0)) for n in METHOD_NAMES}
    assert learn == {"icu": True, "ga": False, "kl": False, "llmu": False, "po": False, "npo": False,
                     "simnpo": False}


# --------------------------------------------------------------------------- the loop


class ForwardSpy:
    """Records the input ids of every forward of ``model``."""

    def __init__(self, model):
        self.inputs = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.inputs.append(kwargs["input_ids"].clone())


@pytest.mark.parametrize("name", ["ga", "po", "simnpo", "npo"])
def test_method_without_learn_term_does_no_learn_forward(name, tmp_path, pairs):
    hp = {"lw": 0.0, "kl": 0.0}
    model = tiny_neo()
    lp = make_loop(tmp_path, pairs, None, model=model, method=name, **hp)
    if not get_method(name).needs_reference(lp.cfg):
        lp.reference_model = None  # as the trainer builds it: no frozen model at all
    spy = ForwardSpy(model)
    lp.state.flags = np.ones(N, dtype=np.int64)
    stats = lp.train_epoch(1)
    assert stats["steps"] == N // 2 and len(spy.inputs) == N // 2  # one forward per step
    learn_rows = {tuple(r.tolist()) for r in pairs.learn.input_ids}
    forget_rows = {tuple(r.tolist()) for r in pairs.unlearn.input_ids}
    seen = {tuple(r.tolist()) for x in spy.inputs for r in x}
    assert seen == forget_rows and not seen & learn_rows
    assert all(np.isfinite(stats[f"loss_{t}"]) for t in get_method(name).terms if t not in ("learn", "kl"))


def old_icu_epoch(opt, model, ref, data, flags, epoch, batch_size=2, seed=42):
    """The pre-registry train_epoch on one device, written out: same order, same ops."""
    model.train()
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = list(torch.utils.data.RandomSampler(data, generator=gen))
    flags = torch.tensor(flags)
    for start in range(0, len(order), batch_size):
        idx = torch.tensor(order[start : start + batch_size])
        idx = idx[flags[idx] == 1]
        if len(idx) == 0:
            continue
        u, l = data.unlearn, data.learn
        u_logits = model(input_ids=u.input_ids[idx], attention_mask=u.attention_mask[idx]).logits
        l_logits = model(input_ids=l.input_ids[idx], attention_mask=l.attention_mask[idx]).logits
        l_unlearn = lm_loss(u_logits, u.labels[idx])
        l_learn = lm_loss(l_logits, l.labels[idx])
        with torch.no_grad():
            p0 = torch.softmax(ref(input_ids=l.input_ids[idx], attention_mask=l.attention_mask[idx]).logits.float(), -1)
        loss = icu_loss(l_unlearn, l_learn, kl_term(l_logits, p0), 1.0, 0.5, 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_icu_is_bit_identical_to_the_pre_registry_step(tmp_path, pairs):
    """Two epochs of the paper's ICU (different flags each epoch), one Adam across both, against
    the old step written out: every weight equal to the bit."""
    model, manual = tiny_neo(), tiny_neo()
    ref = copy.deepcopy(manual).requires_grad_(False)
    lp = make_loop(tmp_path, pairs, None, model=model)
    opt = torch.optim.Adam(manual.parameters(), lr=1e-3, betas=(0.9, 0.98))
    for epoch, flags in enumerate([np.ones(N, dtype=np.int64), np.array([1, 0, 1, 1, 0, 1])], start=1):
        lp.state.flags = flags
        lp.train_epoch(epoch)
        old_icu_epoch(opt, manual, ref, pairs, flags, epoch)
    for (name, a), b in zip(model.named_parameters(), manual.parameters()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- --refine off


class CountingMethod:
    """Wraps a method and counts the samples each step trains on."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.name, self.uses, self.terms = inner.name, inner.uses, inner.terms

    def needs_learn(self, hp):
        return self.inner.needs_learn(hp)

    def needs_reference(self, hp):
        return self.inner.needs_reference(hp)

    def loss(self, b, hp):
        self.seen.append(b.forget_ids.shape[0])
        return self.inner.loss(b, hp)


def scripted(flags_by_epoch, ma=0.95, el=0.5):
    return ScriptedEval([{"F1": [float(f) for f in fl], "bleu": [float(f) for f in fl], "ma": ma, "el": el}
                         for fl in flags_by_epoch])


@pytest.mark.parametrize("refine", ["update", "off"])
def test_refine_off_trains_every_sample_every_epoch(refine, tmp_path, pairs):
    flags = [[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    lp = make_loop(tmp_path, pairs, scripted(flags), method="ga", refine=refine, max_epochs=2)
    lp.method = counting = CountingMethod(lp.method)
    per_epoch = []
    orig = lp.train_epoch

    def spy(epoch):
        counting.seen = []
        out = orig(epoch)
        per_epoch.append(sum(counting.seen))
        return out

    lp.train_epoch = spy
    summary = lp.run()
    hist = summary["final"]
    if refine == "off":
        assert per_epoch == [N, N]  # flags are ignored for training...
        assert "--max_epochs 2" in summary["stop_reason"]  # ...and "no sample flagged" does not stop
        assert hist["flagged"] == 0  # ...but still computed and recorded
    else:
        assert per_epoch == [1, 1]
        assert "no sample" in summary["stop_reason"]


# --------------------------------------------------------------------------- folder names


def test_model_folder_names_say_the_method(tmp_path, pairs):
    from icu.loop import LoopConfig

    icu = LoopConfig(exp="exp0", model_name="m", dir="d")
    assert final_model_dir(icu, 3) == "d/m_exp0_lr5e-06_uw1.0_lw0.5_kl1.0_epoch3_updateboth"  # the reference's
    npo = LoopConfig(exp="exp0", model_name="m", dir="d", method="npo", lw=0.0, kl=0.0)
    assert final_model_dir(npo, 2) == "d/m_exp0_npo_lr5e-06_beta0.1_lw0.0_kl0.0_epoch2_refineupdate"
    off = LoopConfig(exp="exp0", model_name="m", dir="d", refine="off")
    assert final_model_dir(off, 1) == "d/m_exp0_icu_lr5e-06_uw1.0_lw0.5_kl1.0_epoch1_refineoff"
    for name in METHOD_NAMES:
        for refine in ("update", "off"):
            cfg = LoopConfig(exp="e", model_name="m", dir="d", method=name, refine=refine)
            assert is_final_model_dir(final_model_dir(cfg, 12).split("/")[-1])
    assert not is_final_model_dir("epoch3.csv") and not is_final_model_dir("checkpoint")


# --------------------------------------------------------------------------- the trainer's flags


def test_method_defaults_and_ignored_flags_from_the_command_line():
    from icu.trainer import configure_method, parse_args

    base = ["--exp", "e", "--dir", "unused"]
    cfg, method, ignored = configure_method(parse_args(base))
    assert (cfg.method, cfg.refine, cfg.uw, cfg.lw, cfg.kl, cfg.el_ns) == ("icu", "update", 1.0, 0.5, 1.0, (10,))
    assert ignored == []
    cfg, method, ignored = configure_method(parse_args(base + ["--method", "npo", "--uw", "2", "--el_n", "5,10"]))
    assert (cfg.lw, cfg.kl, cfg.beta, cfg.el_ns) == (0.0, 0.0, 0.1, (5, 10))  # plain NPO unless asked
    assert ignored == ["uw"]
    cfg, _, ignored = configure_method(parse_args(base + ["--method", "npo", "--lw", "0.5", "--kl=1"]))
    assert (cfg.lw, cfg.kl) == (0.5, 1.0) and ignored == []
    cfg, _, ignored = configure_method(parse_args(base + ["--method", "ga", "--kl", "1.0", "--gamma", "1"]))
    assert ignored == ["kl", "gamma"]  # explicit even when equal to the default


def test_explicit_dests_sees_only_the_command_line():
    import argparse

    from icu.cli import explicit_dests

    p = argparse.ArgumentParser()
    p.add_argument("--kl", type=float, default=1.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--el_n", default="10")
    p.set_defaults(extra=3)
    assert explicit_dests(p, []) == set()
    assert explicit_dests(p, ["--kl", "1.0", "--resume"]) == {"kl", "resume"}
    assert explicit_dests(p, ["--el_n=5"]) == {"el_n"}
    assert p.parse_args([]).kl == 1.0 and p.parse_args([]).extra == 3  # the parser is untouched


def test_unknown_method_exits_2_listing_the_known_ones(tmp_path, capsys):
    import train_neo_meanwhile_update as trainer

    with pytest.raises(SystemExit) as exc:
        trainer.main(["--method", "dpo", "--dir", str(tmp_path / "x"), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--method 'dpo' is not known; choose one of: icu, ga, kl, llmu, po, npo, simnpo" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_ga_run_names_the_ignored_flag_and_builds_no_frozen_model(mini_exp, tmp_path, monkeypatch):
    import train_neo_meanwhile_update as trainer
    from icu import trainer as trainer_lib

    def no_reference(*a, **k):
        raise AssertionError("ga must not build a frozen model")

    monkeypatch.setattr(trainer_lib, "build_reference", no_reference)
    root, model = mini_exp
    out = tmp_path / "run"
    trainer.main(["--exp", "mini", "--data_dir", str(root), "--model_name", model, *OFFLINE, "--batch_size", "4",
                  "--lr", "3e-4", "--dir", str(out), "--max_epochs", "1", "--method", "ga", "--kl", "2"])
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "ga" and run["refine"] == "update" and run["ignored_flags"] == ["kl"]
    assert run["hyperparameters"] == {"uw": 1.0} and run["epochs"] == 1
    assert run["model_dir"].endswith("model_mini_ga_lr0.0003_uw1.0_epoch1_refineupdate")
    assert "--method ga does not use --kl; ignored" in (out / "res.log").read_text()
    import pandas as pd

    hist = pd.read_csv(out / "history.csv")
    assert "loss_unlearn" in hist and "loss_learn" not in hist and hist["steps"].iloc[1] == 2
    # --overwrite recognises the ga model folder
    trainer.main(["--exp", "mini", "--data_dir", str(root), "--model_name", model, *OFFLINE, "--batch_size", "4",
                  "--lr", "3e-4", "--dir", str(out), "--max_epochs", "0", "--method", "ga", "--overwrite"])
    assert not any(p.name.endswith("epoch1_refineupdate") for p in out.iterdir())
