"""A tiny random LlamaForCausalLM (SmolLM2's architecture in small: grouped-query attention,
RoPE, tied embeddings, its own byte-level BPE with eos <|im_end|> = 2) beside the tiny GPT-Neo
tests: training-sample encoding, the validation pass against the slow reference, the loop's
methods, calibration, the trainer end to end and DeepSpeed ZeRO-3.

The forget-set rows stay GPT-2 ids (the data format); every path re-tokenizes them through
text with the Llama tokenizer (icu.data.encode_rows)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import OFFLINE
from icu.data import encode_rows, save_set
from icu.decoding.beam import generate_candidates, lean_beam_search
from icu.decoding.continuations import GreedyStats
from icu.forget_eval import evaluate_forget_set
from icu.losses import kl_term, lm_loss
from icu.methods import get_method
from icu.metrics import el_column
from icu.models import load_model, load_tokenizer
from fast_paths import greedy_continuations, memorization_and_extraction
from reference_impl import _quiet_generate, slow_el, slow_ma
from test_forget_eval import min_decision_gap
from tiny import (LLAMA_BOS, LLAMA_EOS, family_pairs, family_rows, make_loop, memorize, save_tiny_llama,
                  tiny_llama, tiny_llama_tokenizer, tiny_neo)

torch.set_num_threads(1)

L = 40  # prefix = suffix = target length of these tests' samples
START = 26  # first EL prefix


class ZeroScorer:
    """BERTScore stand-in (the generation check's candidates are what these tests compare)."""

    def score(self, cands, refs):
        z = np.zeros(len(cands))
        return z, z, z


@pytest.fixture(scope="module")
def llama_tok():
    return tiny_llama_tokenizer()


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("add_bos", [False, True])
def test_labels_line_up_with_inputs_for_a_llama_tokenizer(gpt2_tok, add_bos):
    """The loss compares label t with input t: a tokenizer that adds a bos (Llama-2 style) must
    not shift the labels by one; the bos itself is no target."""
    tok = tiny_llama_tokenizer(add_bos)
    rows = family_rows(gpt2_tok, 3, 3, seed=7)
    data = encode_rows(rows, range(3), gpt2_tok, tok, 512, 512)  # every row left-padded (~400 tokens)
    assert len(set(data.attention_mask.sum(1).tolist())) == 3  # by different amounts
    for lab, ids, mask in zip(data.labels, data.input_ids, data.attention_mask):
        real = mask == 1
        assert bool((lab[~real] == -100).all())
        if add_bos:
            first = int(real.nonzero()[0])
            assert int(ids[first]) == LLAMA_BOS and int(lab[first]) == -100
            real[first] = False
        assert torch.equal(lab[real], ids[real]), "labels are shifted against the inputs"
    cut = encode_rows(rows, range(3), gpt2_tok, tok, 24, 24)  # truncated: no padding at all
    assert bool((cut.attention_mask == 1).all())
    if add_bos:
        assert bool((cut.input_ids[:, 0] == LLAMA_BOS).all()) and bool((cut.labels[:, 0] == -100).all())
    assert torch.equal(cut.labels[:, 1:], cut.input_ids[:, 1:])
    assert torch.equal(cut.labels[:, 0] == -100, torch.full((3,), add_bos))


def test_gpt2_encoding_is_unchanged(gpt2_tok):
    """For the GPT-2 BPE (nothing added) the labels are today's: encoded without special tokens,
    padding -100, a real <|endoftext|> in the text kept as a target."""
    rows = family_rows(gpt2_tok, 2, 2, seed=3)
    rows[0, 120] = rows[1, 5] = 50256  # a real eos inside the text
    for n in (24, 200, 230):
        data = encode_rows(rows, [0, 1], gpt2_tok, gpt2_tok, n, n)
        texts = gpt2_tok.batch_decode(rows.tolist())
        old = gpt2_tok(texts, max_length=n, padding="max_length", truncation=True, add_special_tokens=False,
                       return_tensors="pt")
        want = old["input_ids"].masked_fill(old["attention_mask"] == 0, -100)
        assert torch.equal(data.labels, want)
    assert int((data.labels == 50256).sum()) >= 2


# --------------------------------------------------------------------------- validation pass


def _llama_text(gpt2_tok, tok, n: int, seed: int, pads, steps: int = 80):
    """A tiny Llama that partly memorized ``n`` generated rows (L tokens each, its tokenizer),
    then left padding of ``pads[b]`` tokens: (model, EncodedSet)."""
    rows = family_rows(gpt2_tok, n, 2, seed=seed)
    data = encode_rows(rows, range(n), gpt2_tok, tok, L, L)
    model = memorize(tiny_llama(seed), data.input_ids, data.attention_mask, steps=steps)
    for b, p in enumerate(pads):
        data.input_ids[b, :p] = tok.pad_token_id
        data.attention_mask[b, :p] = 0
        data.labels[b, :p] = -100
    return model, data


@pytest.fixture(scope="module")
def memorized(gpt2_tok, llama_tok):
    return _llama_text(gpt2_tok, llama_tok, 4, seed=11, pads=[0, 3, 17, 30])


def test_fast_ma_el_equal_reference_on_tiny_llama(memorized):
    """RoPE position ids from the attention mask (left padding), GQA key/value cache slices and
    the preallocated cache: MA and EL_n equal one generate per prefix."""
    model, data = memorized
    x, mask = data.input_ids, data.attention_mask
    ns = (1, 3, 10)
    fav = int(torch.mode(model(input_ids=x).logits.argmax(-1).flatten()).values)
    for eos in (LLAMA_EOS, fav):  # the model's favourite token as eos: continuations end early
        model.generation_config.eos_token_id = eos
        ref_ma = slow_ma(model, x, mask, L, LLAMA_EOS)
        ref_el = slow_el(model, x, mask, L, ns, LLAMA_EOS, START)
        assert 0 < np.nanmean(ref_ma) < 1 and any(v > 0 for v in ref_el[3] if v == v)
        for kw in ({}, {"batch_size": 3, "max_rows": 5}, {"reuse_cache": False, "batch_size": 2}):
            stats = GreedyStats()
            ma, el = memorization_and_extraction(model, x, mask, L, ns, start=START, pad_token_id=LLAMA_EOS,
                                                 stats=stats, **kw)
            np.testing.assert_allclose(ma.numpy(), ref_ma, rtol=0, atol=1e-9, equal_nan=True)
            for n in ns:
                np.testing.assert_allclose(el[n].numpy(), ref_el[n], rtol=0, atol=1e-9, equal_nan=True)
            assert 0 < stats.decoded_rows < stats.prefixes
        G = greedy_continuations(model, x, mask, L, start=START, pad_token_id=LLAMA_EOS, eos_token_ids=[eos])
        gap = min_decision_gap(model, x, mask, L, START, G, {eos})
        assert gap > 1e-5, f"near tie ({gap:.2e}) in the test model: pick another seed"
    model.generation_config.eos_token_id = LLAMA_EOS


def test_evaluate_forget_set_on_tiny_llama_equals_reference(memorized, gpt2_tok, llama_tok):
    model, data = memorized
    res = evaluate_forget_set(model, llama_tok, gpt2_tok, data, scorer=ZeroScorer(), batch_size=3,
                              target_length=L, el_ns=(3,), el_start=START, progress=False)
    df = res.per_sample
    pad = llama_tok.pad_token_id
    np.testing.assert_allclose(df["ma"], slow_ma(model, data.input_ids, data.attention_mask, L, pad), atol=1e-9)
    ref_el = slow_el(model, data.input_ids, data.attention_mask, L, (3,), pad, START)[3]
    np.testing.assert_allclose(df[el_column(3, START)], ref_el, atol=1e-9, equal_nan=True)
    # the loss as the reference's batches compute it (default positions, padding masked)
    with torch.no_grad():
        want = [float(model(input_ids=data.input_ids[s:s + 3], attention_mask=data.attention_mask[s:s + 3],
                            labels=data.labels[s:s + 3]).loss) for s in (0, 3)]
    assert res.val_loss == pytest.approx(np.mean(want), rel=1e-5)
    # the generation check's candidates: generate's beam search on the Llama-tokenized prompts
    prompts = gpt2_tok.batch_decode(data.prefix_ids.tolist())
    enc = llama_tok(prompts, max_length=50, padding="max_length", truncation=True, return_tensors="pt",
                    padding_side="left")
    out = _quiet_generate(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          max_new_tokens=50, num_beams=2, do_sample=False, pad_token_id=pad)[:, 50:]
    out = torch.nn.functional.pad(out, (0, 50 - out.shape[1]), value=pad)
    assert df["candidate"].tolist() == llama_tok.batch_decode(out.tolist())
    assert torch.equal(generate_candidates(model, llama_tok, prompts, impl="lean"), out)


@pytest.mark.parametrize("seed", [0, 3])
def test_lean_beam_search_equals_generate_on_tiny_llama(seed):
    """Left-padded prompts (RoPE positions from the mask), hypotheses ending on eos."""
    model = tiny_llama(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 512, (4, 12), generator=g)
    mask = torch.ones_like(x)
    for b, p in enumerate([0, 3, 0, 7]):
        mask[b, :p] = 0
        x[b, :p] = LLAMA_EOS
    # eos: the token the beams emit most, so hypotheses end at different lengths
    first = _quiet_generate(model, input_ids=x, attention_mask=mask, max_new_tokens=20, num_beams=2,
                            do_sample=False, pad_token_id=LLAMA_EOS)[:, 12:]
    fav = int(torch.mode(first.flatten()).values)
    model.generation_config.eos_token_id = fav
    want = _quiet_generate(model, input_ids=x, attention_mask=mask, max_new_tokens=20, num_beams=2,
                           do_sample=False, pad_token_id=LLAMA_EOS)[:, 12:]
    want = torch.nn.functional.pad(want, (0, 20 - want.shape[1]), value=LLAMA_EOS)
    got = lean_beam_search(model, x, mask, new_tokens=20, num_beams=2, pad_token_id=LLAMA_EOS)
    assert torch.equal(got, want)
    assert bool((want == fav).any())


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def llama_pairs(gpt2_tok, llama_tok):
    return family_pairs(gpt2_tok, 4, 2, seed=2, tokenizer=llama_tok)


def test_icu_step_on_tiny_llama_uses_the_original_model_as_kl_reference(tmp_path, llama_pairs):
    """Two epochs of ICU (one step each, every sample flagged) equal Adam written out with the
    KL term against the ORIGINAL model (tied embeddings: one weight for input and output)."""
    model = tiny_llama(3)
    manual, original = copy.deepcopy(model), copy.deepcopy(model)
    lp = make_loop(tmp_path, llama_pairs, None, model=model)
    lp.cfg.batch_size = len(llama_pairs)
    lp.state.flags = np.ones(len(llama_pairs), dtype=np.int64)
    u, l = llama_pairs.unlearn, llama_pairs.learn
    opt = torch.optim.Adam(manual.parameters(), lr=1e-3, betas=(0.9, 0.98))
    manual.train()
    for epoch in (1, 2):
        stats = lp.train_epoch(epoch)
        assert stats["steps"] == 1 and np.isfinite(stats["loss_kl"])
        ul = manual(input_ids=u.input_ids, attention_mask=u.attention_mask).logits
        ll = manual(input_ids=l.input_ids, attention_mask=l.attention_mask).logits
        with torch.no_grad():
            p0 = torch.softmax(original(input_ids=l.input_ids, attention_mask=l.attention_mask).logits, -1)
        loss = -lm_loss(ul, u.labels) + 0.5 * lm_loss(ll, l.labels) + kl_term(ll, p0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for (name, a), b in zip(model.named_parameters(), manual.parameters()):
            assert torch.allclose(a, b, atol=1e-6), (epoch, name)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    for a, b in zip(lp.reference_model.parameters(), original.parameters()):
        assert torch.equal(a, b)  # the frozen reference never moved


@pytest.mark.parametrize("method", ["npo", "ga"])
def test_methods_train_tiny_llama(method, tmp_path, llama_pairs):
    model = tiny_llama(4)
    before = [p.detach().clone() for p in model.parameters()]
    lp = make_loop(tmp_path, llama_pairs, None, model=model, method=method, lw=0.0, kl=0.0)
    if not get_method(method).needs_reference(lp.cfg):
        lp.reference_model = None
    lp.state.flags = np.ones(len(llama_pairs), dtype=np.int64)
    stats = lp.train_epoch(1)
    assert stats["steps"] == 2
    assert all(np.isfinite(stats[f"loss_{t}"]) for t in get_method(method).terms if t not in ("learn", "kl"))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --------------------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def llama_world(gpt2_tok, llama_tok, tmp_path_factory):
    """A tiny Llama folder (model + its tokenizer) that partly memorized split "mini"'s 4 targets,
    the split (4 targets, 4 learn rows of their families) and 3 unseen rows."""
    root = tmp_path_factory.mktemp("llama")
    rows = family_rows(gpt2_tok, 11, 2, seed=21)
    data = encode_rows(rows[:4], range(4), gpt2_tok, llama_tok, L, L)
    model = memorize(tiny_llama(5), data.input_ids, data.attention_mask, steps=60)
    folder = save_tiny_llama(root / "model", model=model)
    save_set(str(root / "data" / "mini" / "unlearn"), rows[:4], np.arange(4))
    save_set(str(root / "data" / "mini" / "learn"), rows[4:8], np.arange(4, 8))
    np.save(root / "train.npy", rows)
    np.save(root / "unseen.npy", np.arange(8, 11))
    return {"root": root, "model": folder, "rows": rows}


LENGTHS = ["--prefix_length", str(L), "--suffix_length", str(L), "--target_length", str(L), "--el_start", str(START)]


def test_calibration_on_tiny_llama_equals_slow_reference(llama_world, gpt2_tok, tmp_path):
    import eval as eval_script

    w = llama_world
    eval_script.main(["--calibrate", "--unseen_rows", str(w["root"] / "unseen.npy"),
                      "--train_file", str(w["root"] / "train.npy"), "--model_name", w["model"], *OFFLINE,
                      "--dir", str(tmp_path), "--no_progress", "--data_dir", str(w["root"] / "data"),
                      "--exp", "mini", *LENGTHS])
    th = json.loads((tmp_path / "thresholds.json").read_text())
    per_row = pd.read_csv(tmp_path / "calibration.csv")
    tok = load_tokenizer(w["model"])
    model = load_model(w["model"])
    data = encode_rows(w["rows"][8:11], range(8, 11), gpt2_tok, tok, L, L)
    ma = np.asarray(slow_ma(model, data.input_ids, data.attention_mask, L, tok.pad_token_id))
    el = np.asarray(slow_el(model, data.input_ids, data.attention_mask, L, (10,), tok.pad_token_id, START)[10])
    np.testing.assert_allclose(per_row["ma"], ma, atol=1e-9)
    assert th["ma"] == pytest.approx(ma.mean(), abs=1e-12)
    assert th["el"]["10"] == pytest.approx(np.nanmean(el), abs=1e-12)


@pytest.mark.slow
def test_trainer_end_to_end_on_tiny_llama(llama_world, tmp_path):
    import train_neo_meanwhile_update as trainer

    w = llama_world
    out = tmp_path / "run"
    trainer.main(["--exp", "mini", "--data_dir", str(w["root"] / "data"), "--model_name", w["model"], *OFFLINE,
                  "--batch_size", "2", "--lr", "1e-3", "--dir", str(out), "--max_epochs", "1",
                  "--f1", "0", "--bleu", "0", *LENGTHS])  # every target flagged: epoch 1 trains
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs"] == 1
    assert run["tokenizer_check"]["round_trip_share"] is None  # its own ids, not GPT-2's
    history = pd.read_csv(out / "history.csv")
    assert history.loc[0, "acc"] > 0.1 and np.isfinite(history["loss_unlearn"].iloc[-1])
    trained = load_model(run["model_dir"])
    assert trained.config.model_type == "llama" and trained.lm_head.weight is trained.model.embed_tokens.weight
    assert not torch.equal(trained.model.embed_tokens.weight, load_model(w["model"]).model.embed_tokens.weight)


@pytest.mark.slow
def test_deepspeed_zero3_two_ranks_on_tiny_llama_match_single_device(tmp_path):
    """ZeRO-3 on 2 CPU ranks (tests/ds_worker.py ... llama): validation and the saved model go
    through the gathered full copy (icu.engine.DeepSpeedEngine._full_copy), whose tied
    embedding and RoPE buffers must be those of the trained model."""
    import os

    from test_deepspeed_multirank import HISTORY_NUMBERS, check, final_weights, max_weight_diff, torchrun

    check(torchrun(2, os.path.join("tests", "ds_worker.py"), str(tmp_path), "llama"))
    ds = pd.read_csv(tmp_path / "llama_zero3" / "history.csv")
    single = pd.read_csv(tmp_path / "llama_single" / "history.csv")
    assert ds["flagged"].tolist()[0] == 8 and ds["steps"].iloc[1] > 0
    pd.testing.assert_frame_equal(ds[HISTORY_NUMBERS], single[HISTORY_NUMBERS], rtol=1e-5, atol=1e-6)
    a, b = final_weights(str(tmp_path / "llama_zero3")), final_weights(str(tmp_path / "llama_single"))
    assert max_weight_diff(a, b) < 1e-4
    assert torch.equal(a["lm_head.weight"], a["model.embed_tokens.weight"])  # still tied when saved


def test_trainer_checks_gpt2_rows_and_the_models_ids(llama_world, tmp_path, capsys):
    """The rows must be GPT-2 ids (< 50257) whatever the model; the model's own vocabulary is
    checked on their re-encoding only (a 512-id Llama accepts rows of GPT-2 ids up to 50256)."""
    import shutil

    import train_neo_meanwhile_update as trainer
    from icu.data import load_set

    w = llama_world
    bad = tmp_path / "data"
    shutil.copytree(w["root"] / "data" / "mini", bad / "mini")
    rows, ids = load_set(str(bad / "mini" / "learn"))
    rows[1, 7] = 60000
    save_set(str(bad / "mini" / "learn"), rows, ids)
    with pytest.raises(SystemExit) as exc:
        trainer.main(["--exp", "mini", "--data_dir", str(bad), "--model_name", w["model"], *OFFLINE,
                      "--dir", str(tmp_path / "x"), *LENGTHS])
    assert exc.value.code == 2
    assert "row 1 holds token id 60000 (column 7)" in capsys.readouterr().err
    assert int(w["rows"][:8].max()) >= 512  # the good rows hold ids far beyond the model's vocabulary


def test_decode_rows_count_the_key_value_heads_of_grouped_query_attention():
    """With grouped-query attention the EL decoder's key/value cache per row is kv_heads/heads of
    the hidden size, so more rows fit the same budget (SmolLM2-135M: 3 of 9 heads)."""
    from icu.decoding.continuations import default_decode_rows, kv_width

    gqa = tiny_llama(0)
    assert kv_width(gqa.config) == gqa.config.num_key_value_heads * gqa.config.head_dim < gqa.config.hidden_size
    assert kv_width(tiny_neo().config) == tiny_neo().config.hidden_size
    full = tiny_llama(0, num_kv_heads=gqa.config.num_attention_heads)
    assert default_decode_rows(gqa, 2000) == 2 * default_decode_rows(full, 2000)


@pytest.mark.slow
def test_el_when_needed_is_the_same_run_on_tiny_llama(llama_world, tmp_path):
    from test_trainer_cli import check_el_when_needed_is_the_same_run

    w = llama_world
    argv = ["--exp", "mini", "--data_dir", str(w["root"] / "data"), "--model_name", w["model"], *OFFLINE,
            "--batch_size", "2", "--lr", "2e-2", "--method", "ga", "--f1", "0", "--bleu", "0", *LENGTHS]
    check_el_when_needed_is_the_same_run(argv, tmp_path)
