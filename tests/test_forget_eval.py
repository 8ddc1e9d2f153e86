"""icu.forget_eval and icu.decoding: the fast MA / EL path against the slow reference (one
generate per prefix), and the validation pass as the trainers call it.

Exactness and floating point: the slow reference takes greedy tokens from generate (a prefill
of the prefix, then cached steps of its own batch); the fast path takes them from one pass over
the whole sequence and from decode batches of other shapes. In fp32 the logits of the two differ
by ~1e-7, so they agree on every argmax unless two tokens nearly tie. The random-model tests
therefore also check that no greedy decision of their models has a top-2 logit gap below 1e-5
(a near tie would make equality depend on the machine, and the test would say so).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icu.data import EncodedSet, encode_rows
from icu.errors import IcuError
from icu.decoding.beam import generate_candidates, lean_beam_search
from icu.decoding.continuations import GreedyStats
from icu.forget_eval import GEN_COLUMNS, evaluate_forget_set
from icu.metrics import el_prefixes, flag_rule, get_bertscorer, ma_positions
from fast_paths import greedy_continuations, memorization_and_extraction
from reference_impl import reference_evaluate, slow_el, slow_ma
from tiny import decoding_neo

torch.set_num_threads(1)  # tests share 2 cores; one thread is also the fastest for tiny models

PAD = 511


@torch.no_grad()
def self_text(model, seed: int, B: int, L: int, pads: list[int], noise: float = 0.08):
    """Rows the model partly "memorized": its own greedy continuation of a random start, with a
    fraction of tokens replaced at random (so it both follows and leaves the text), then left
    padding of ``pads[b]`` tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 500, (B, 5), generator=g)
    for _ in range(L - 5):
        nxt = model(input_ids=x).logits[:, -1].argmax(-1)
        swap = torch.rand(B, generator=g) < noise
        x = torch.cat([x, torch.where(swap, torch.randint(0, 500, (B,), generator=g), nxt)[:, None]], 1)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    x[mask == 0] = PAD
    return x, mask


@torch.no_grad()
def min_decision_gap(model, x, mask, T, start, G, eos) -> float:
    """Smallest top-2 logit gap over every greedy decision MA and EL make (counted positions)."""
    pos = mask.cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    logits = model(input_ids=x[:, :T], attention_mask=mask[:, :T], position_ids=pos[:, :T]).logits
    top = logits.topk(2, -1).values
    gap = top[..., 0] - top[..., 1]  # (B, T): gap of the decision after x_<=j
    gaps = [gap[:, :T - 1][ma_positions(mask, T)]]
    counted = el_prefixes(mask, T, start)
    seqs, masks, spans = [], [], []
    for b, k in counted.nonzero().tolist():
        i = start + k
        cont = G[b, k, : T - i]
        if cont[0] == x[b, i] or cont[0] in eos:
            continue
        seqs.append(torch.cat([x[b, :i], cont]))
        masks.append(torch.cat([mask[b, :i], torch.ones(T - i, dtype=torch.long)]))
        stop = T - 1
        hits = [j for j, t in enumerate(cont.tolist()) if t in eos]
        if hits:
            stop = i + hits[0]
        spans.append((i, stop))
    if seqs:
        s, m = torch.stack(seqs), torch.stack(masks)
        p = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
        top = model(input_ids=s, attention_mask=m, position_ids=p).logits.topk(2, -1).values
        g2 = top[..., 0] - top[..., 1]
        for r, (i, stop) in enumerate(spans):
            gaps.append(g2[r, i:stop])
    return float(torch.cat([g.flatten() for g in gaps]).min())


# --------------------------------------------------------------------------- exactness, random models


CASES = [
    # seed, L (input length), T (target length), start (first EL prefix), left padding per row
    (0, 80, 72, 40, [0, 3, 45, 0]),
    (1, 64, 64, 40, [0, 0, 1, 30]),
    (2, 90, 80, 60, [70, 0, 2, 0]),  # row 0: early EL prefixes have no real context
]


@pytest.mark.parametrize("seed, L, T, start, pads", CASES)
def test_fast_equals_reference_on_random_models(seed, L, T, start, pads):
    model = decoding_neo(seed)
    x, mask = self_text(model, seed, len(pads), L, pads)
    ns = (1, 3, 10)
    # Also make the model's favourite token the eos, so continuations end early and the
    # "pad after eos" rule is exercised on both paths.
    fav = int(torch.mode(model(input_ids=x[:, :T]).logits.argmax(-1).flatten()).values)
    for eos in (PAD, fav):
        model.generation_config.eos_token_id = eos
        ref_ma = slow_ma(model, x, mask, T, PAD)
        ref_el = slow_el(model, x, mask, T, ns, PAD, start)
        assert any(v > 0 for v in ref_el[3] if v == v), "test data should give some extraction"
        for kw in ({}, {"batch_size": 2, "max_rows": 7}, {"reuse_cache": False, "batch_size": 3}):
            stats = GreedyStats()
            ma, el = memorization_and_extraction(
                model, x, mask, T, ns, start=start, pad_token_id=PAD, stats=stats, **kw
            )
            np.testing.assert_allclose(ma.numpy(), ref_ma, rtol=0, atol=1e-9, equal_nan=True)
            for n in ns:
                np.testing.assert_allclose(el[n].numpy(), ref_el[n], rtol=0, atol=1e-9, equal_nan=True)
            assert 0 < stats.decoded_rows < stats.prefixes  # it follows the text in places, not all
        G = greedy_continuations(model, x, mask, T, start=start, pad_token_id=PAD, eos_token_ids=[eos])
        gap = min_decision_gap(model, x, mask, T, start, G, {eos})
        assert gap > 1e-5, f"near tie ({gap:.2e}) in the test model: pick another seed"


def test_el_counts_every_n_gram_position_of_the_continuation():
    """A model stuck on one token: its continuation is that token repeated; when the label
    holds that token in a run, each generated n-gram position counts (repeats included)."""
    model = decoding_neo(3)
    x0 = torch.randint(0, 500, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fav = int(model(input_ids=x0).logits[0, -1].argmax())
    T, start = 30, 20
    x = torch.cat([x0, torch.full((1, T - 5), fav)], 1)
    mask = torch.ones_like(x)
    ma, el = memorization_and_extraction(model, x, mask, T, (2,), start=start, pad_token_id=PAD)
    ref = slow_el(model, x, mask, T, (2,), PAD, start)
    assert float(el[2][0]) == pytest.approx(ref[2][0], abs=1e-12)


# --------------------------------------------------------------------------- output layer


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_head_equals_full_argmax_and_cross_entropy(dtype, vocab_major):
    from icu.decoding.head import head_argmax

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=True).to(dtype)
    with torch.no_grad():
        head.weight[3] *= 4
        head.bias[3] = 5.0
        head.weight[700] = head.weight[3]  # exact ties across tiles: the lower id must win
        head.bias[700] = head.bias[3]
    hidden = torch.randn(37, 16).to(dtype)
    labels = torch.randint(0, 1000, (37,))
    labels[5] = -100
    with torch.no_grad():
        logits = head(hidden)
        want = logits.argmax(-1)
        ce = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
        assert (want == 3).any() and torch.equal(logits[:, 3], logits[:, 700])  # live ties
        for tiles in (None, (37, 1000), (5, 64), (16, 999), (1, 1)):
            preds, loss = head_argmax(hidden, head, labels, tiles=tiles, vocab_major=vocab_major)
            assert torch.equal(preds, want), tiles
            valid = labels != -100
            torch.testing.assert_close(loss[valid], ce[valid], rtol=1e-5, atol=1e-5)
            assert torch.isnan(loss[5])


@pytest.mark.parametrize("vocab_major", [False, True])
def test_tiled_head_argmax_points_at_nan_like_torch_argmax(vocab_major):
    """A NaN logit wins torch.argmax; the tiled head (which skips rows whose maximum a tile does
    not raise) must agree."""
    from icu.decoding.head import head_argmax

    torch.manual_seed(2)
    head = torch.nn.Linear(8, 300, bias=False)
    with torch.no_grad():
        head.weight[250, 0] = float("nan")  # logit 250 is NaN wherever hidden[:, 0] != 0
    hidden = torch.randn(6, 8)
    hidden[2, 0] = 0.0  # ... 0 * NaN is NaN too
    hidden[4] = float("nan")  # every logit NaN: argmax is 0
    with torch.no_grad():
        want = head(hidden).argmax(-1)
        assert want[4] == 0 and want[0] == 250
        for tiles in (None, (6, 300), (2, 64), (1, 7)):
            preds, _ = head_argmax(hidden, head, tiles=tiles, vocab_major=vocab_major)
            assert torch.equal(preds, want), tiles


@pytest.mark.parametrize("vocab_major", [False, True])
def test_top_candidates_equal_full_topk_and_logsumexp(vocab_major):
    from icu.decoding.head import top_candidates

    torch.manual_seed(1)
    V = 9000  # more than one 4096-wide tile
    head = torch.nn.Linear(16, V, bias=True)
    with torch.no_grad():
        head.weight[8500] = head.weight[10] * 3  # strong candidates in the last tile ...
        head.bias[8500] = 4.0
        head.weight[12] = head.weight[8500]  # ... tied with one in the first tile
        head.bias[12] = 4.0
    hidden = torch.randn(23, 16)
    with torch.no_grad():
        logits = head(hidden)
        want_v, _ = logits.topk(4, dim=-1)
        top_v, top_i, lse = top_candidates(hidden, head, 4, vocab_major=vocab_major)
    torch.testing.assert_close(top_v, want_v, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits.gather(1, top_i), top_v, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-6, atol=1e-5)
    # an exact tie across tiles keeps both ids (which comes first is up to topk, as in generate)
    both = (top_i == 12).any(1) & (top_i == 8500).any(1)
    assert both.any() and torch.equal(logits[:, 12], logits[:, 8500])


# --------------------------------------------------------------------------- beam search


@pytest.mark.parametrize(
    "seed, beams, length_penalty, early_stopping",
    [(0, 2, 1.0, False), (1, 2, 1.0, False), (2, 3, 0.5, True), (3, 2, 2.0, "never")],
)
def test_lean_beam_search_equals_generate(seed, beams, length_penalty, early_stopping):
    model = decoding_neo(seed)
    x, mask = self_text(model, seed, 4, 12, [0, 3, 0, 7], noise=0.5)
    # the model's favourite token as eos, so hypotheses end at different lengths
    fav = int(torch.mode(model(input_ids=x).logits.argmax(-1).flatten()).values)
    cfg = model.generation_config
    cfg.eos_token_id, cfg.length_penalty, cfg.early_stopping = fav, length_penalty, early_stopping
    new = 20
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    want = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, num_beams=beams,
                          do_sample=False, pad_token_id=PAD)[:, x.shape[1]:]
    want = torch.nn.functional.pad(want, (0, new - want.shape[1]), value=PAD)
    got = lean_beam_search(model, x, mask, new_tokens=new, num_beams=beams, pad_token_id=PAD)
    assert torch.equal(got, want)
    assert bool((want == fav).any())  # some hypothesis did end with eos


# --------------------------------------------------------------------------- the toy world


@pytest.fixture(scope="module")
def toy(toy_world, gpt2_tok):
    from icu.models import load_model, load_tokenizer

    model = load_model(toy_world["model"])
    tok = load_tokenizer(toy_world["model"])
    rows = np.load(toy_world["train_file"])
    ids = np.asarray(toy_world["meta"]["target_ids"], dtype=np.int64)
    data = encode_rows(rows[ids[:8]], ids[:8], gpt2_tok, tok)
    return {"model": model, "tok": tok, "gpt2": gpt2_tok, "data": data}


@pytest.mark.slow
def test_fast_equals_reference_on_toy_model(toy):
    model, data = toy["model"], toy["data"]
    x = data.input_ids[:4].clone()
    mask = data.attention_mask[:4].clone()
    for b, p in ((1, 5), (2, 60), (3, 170)):  # left padding, the last one reaching into EL
        mask[b, :p] = 0
        x[b, :p] = toy["tok"].pad_token_id
    pad = toy["tok"].pad_token_id
    ref_ma = slow_ma(model, x, mask, 200, pad)
    ref_el = slow_el(model, x, mask, 200, (10,), pad)
    stats = GreedyStats()
    ma, el = memorization_and_extraction(model, x, mask, 200, (10,), pad_token_id=pad, stats=stats)
    np.testing.assert_allclose(ma.numpy(), ref_ma, rtol=0, atol=1e-9)
    np.testing.assert_allclose(el[10].numpy(), ref_el[10], rtol=0, atol=1e-9)
    assert ma[0] > 0.9 and el[10][0] > 0.5  # it did memorize its targets
    assert stats.decoded_rows < stats.prefixes / 4  # ...so few prefixes needed decoding


def test_evaluate_forget_set_on_toy(toy):
    model, tok, gpt2, data = toy["model"], toy["tok"], toy["gpt2"], toy["data"]
    scorer = get_bertscorer("builtin:all-MiniLM-L6-v2", "cpu")
    model.train()  # the trainer may call it in train mode: it must come back that way
    res = evaluate_forget_set(model, tok, gpt2, data, scorer=scorer, batch_size=4, progress=False)
    assert model.training
    model.eval()
    df = res.per_sample
    assert list(df.columns) == list(GEN_COLUMNS) + ["ma", "el_10", "loss"]
    assert df["id"].tolist() == data.doc_ids.tolist()
    assert res.flags.dtype == np.int64
    assert res.flags.tolist() == flag_rule(df["F1"], df["bleu"], 0.3, 0.01).tolist()
    assert res.loss_batches == 2 and res.val_loss == pytest.approx(res.loss_sum / 2)
    assert res.ma == pytest.approx(df["ma"].mean()) and res.el[10] == pytest.approx(df["el_10"].mean())
    summary = res.summary()
    for key in ("bleu", "P", "R", "F1", "diff", "entropy", "val_loss", "ma", "el_10", "loss"):
        assert np.isfinite(summary[key])

    # The lean beam search and generate agree on the toy model.
    prompts = gpt2.batch_decode(data.prefix_ids.tolist())
    assert torch.equal(generate_candidates(model, tok, prompts, impl="lean"),
                       generate_candidates(model, tok, prompts, impl="hf"))

    # The generation check and the loss, against the reference's batch loop.
    from icu.models import resolve_bertscore_model

    path, layers = resolve_bertscore_model("builtin:all-MiniLM-L6-v2")
    ref = reference_evaluate(model, tok, gpt2, data, bert_path=path, bert_layers=layers,
                             batch_size=4, ma=False, el=False)
    rdf = ref["per_sample"]
    assert df["candidate"].tolist() == rdf["candidate"].tolist()
    for col in ("bleu", "diff", "entropy"):
        np.testing.assert_array_equal(df[col].to_numpy(), rdf[col].to_numpy())
    for col in ("P", "R", "F1"):
        np.testing.assert_allclose(df[col].to_numpy(), rdf[col].to_numpy(), atol=1e-5)
    assert res.val_loss == pytest.approx(ref["val_loss"], rel=1e-5)

    # A subset (how the DeepSpeed trainer shards the set) gives the same rows.
    part = evaluate_forget_set(model, tok, gpt2, data, scorer=scorer, batch_size=4, indices=[5, 2],
                               progress=False)
    sub = df.iloc[[5, 2]].reset_index(drop=True)
    assert part.per_sample["id"].tolist() == sub["id"].tolist()
    for col in ("ma", "el_10", "bleu", "diff"):
        np.testing.assert_allclose(part.per_sample[col].to_numpy(), sub[col].to_numpy(), atol=1e-9)
    np.testing.assert_allclose(part.per_sample["loss"].to_numpy(), sub["loss"].to_numpy(), rtol=1e-5)

    # Without the generation check: no scorer needed, flags all 0, text columns empty.
    quick = evaluate_forget_set(model, tok, gpt2, data, generation=False, batch_size=8, indices=[0, 1],
                                progress=False)
    assert quick.flags.tolist() == [0, 0]
    assert quick.per_sample["candidate"].tolist() == ["", ""]
    assert quick.per_sample["bleu"].isna().all()
    np.testing.assert_allclose(quick.per_sample["ma"].to_numpy(), df["ma"].to_numpy()[:2], atol=1e-9)
    model.eval()


def test_wrapped_model_is_unwrapped_and_modes_restored(toy):
    class Wrapper(torch.nn.Module):  # like DDP / a DeepSpeed engine: the model is .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(toy["model"])
    wrapped.train()
    res = evaluate_forget_set(wrapped, toy["tok"], toy["gpt2"], toy["data"], generation=False,
                              indices=[0], el_ns=(5, 10), progress=False)
    assert wrapped.training and toy["model"].training
    assert list(res.el) == [5, 10] and {"el_5", "el_10"} <= set(res.per_sample.columns)
    toy["model"].eval()


# --------------------------------------------------------------------------- bad input


def test_bad_input_raises_icu_error(toy):
    model, tok, gpt2, data = toy["model"], toy["tok"], toy["gpt2"], toy["data"]
    kw = dict(generation=False, progress=False)
    with pytest.raises(IcuError, match="empty"):
        evaluate_forget_set(model, tok, gpt2, data, indices=[], **kw)
    empty = EncodedSet(*(t[:0] for t in (data.input_ids, data.attention_mask, data.labels,
                                         data.prefix_ids, data.suffix_ids, data.doc_ids)))
    with pytest.raises(IcuError, match="empty"):
        evaluate_forget_set(model, tok, gpt2, empty, **kw)
    with pytest.raises(IcuError, match="longer than the encoded data"):
        evaluate_forget_set(model, tok, gpt2, data, target_length=201, **kw)
    with pytest.raises(IcuError, match="EL_51"):
        evaluate_forget_set(model, tok, gpt2, data, el_ns=(10, 51), **kw)
    small = decoding_neo(0, vocab_size=1000)
    with pytest.raises(IcuError, match="vocabulary"):
        evaluate_forget_set(small, tok, gpt2, data, **kw)
    with pytest.raises(IcuError, match="indices"):
        evaluate_forget_set(model, tok, gpt2, data, indices=[0, 99], **kw)

