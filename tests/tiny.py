"""Tiny random GPT-Neo models, generated toy text, stand-in evaluators and an ICU loop on them.

Plain functions, not fixtures: tests/ds_worker.py runs under torchrun and must build the very same
models and loops as the in-process tests. conftest.py wraps the common cases as fixtures.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from icu.data import PairedDataset, encode_rows
from icu.engine import TorchEngine
from icu.losses import lm_loss
from icu.loop import ICULoop, LoopConfig
from icu.models import BUILTIN_GPT2, load_tokenizer
from icu.toy import tiny_neo_config
from icu.toytext import generate_families

LEN = 24  # prefix and suffix tokens of the loop tests' samples
N_PAIRS = 6  # unlearn/learn pairs in conftest's ``pairs`` fixture


def gpt2_tokenizer():
    """The built-in GPT-2 BPE as the trainers load it (left padding with eos)."""
    return load_tokenizer(BUILTIN_GPT2)


def tiny_neo(seed: int = 0, *, hidden_size: int = 16, num_layers: int = 1, num_heads: int = 2,
             vocab_size: int = 50257, **config):
    """A random GPT-Neo in eval mode, built right after ``torch.manual_seed(seed)``: the same
    arguments give the same weights. ``config`` overrides other GPTNeoConfig fields."""
    from transformers import GPTNeoForCausalLM

    torch.manual_seed(seed)
    return GPTNeoForCausalLM(tiny_neo_config(hidden_size, num_layers, num_heads, vocab_size, **config)).eval()


def decoding_neo(seed: int, vocab_size: int = 512):
    """The decoding tests' model: 2 layers (global + local attention), a small vocabulary whose
    last id is bos/eos/pad, and a wide init (std 0.2) so that greedy decisions rarely near-tie."""
    last = vocab_size - 1
    return tiny_neo(seed, hidden_size=64, num_layers=2, num_heads=4, vocab_size=vocab_size,
                    attention_types=[[["global", "local"], 1]], initializer_range=0.2,
                    bos_token_id=last, eos_token_id=last, pad_token_id=last)


def save_tiny_neo(path, seed: int = 0, tokenizer=None, **shape) -> str:
    """``tiny_neo(seed, **shape)`` saved in ``path`` (with ``tokenizer`` when given): a --model_name."""
    tiny_neo(seed, **shape).save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return str(path)


def family_rows(tok, num_docs: int, family_size: int, seed: int) -> np.ndarray:
    """(num_docs, 200) uint16 GPT-2 ids of generated documents in families of near-duplicates."""
    docs = generate_families(num_docs, family_size, seed=seed, sentences_per_doc=18)
    return np.asarray([tok(t)["input_ids"][:200] for _, t in docs], dtype=np.uint16)


def family_pairs(tok, n: int, family_size: int, seed: int, tokenizer=None) -> PairedDataset:
    """``n`` unlearn rows (ids 0..n-1) paired with ``n`` learn rows, LEN-token prefix and suffix:
    GPT-2 id rows (``tok``) encoded for the model's ``tokenizer`` (default: ``tok`` itself)."""
    rows = family_rows(tok, 2 * n, family_size, seed)
    model_tok = tok if tokenizer is None else tokenizer
    enc = lambda r, ids: encode_rows(r, ids, tok, model_tok, prefix_length=LEN, suffix_length=LEN)
    return PairedDataset(enc(rows[:n], range(n)), enc(rows[n:], range(n, 2 * n)))


def _result(data, idx, flags, f1, bleu, ma, el, loss, loss_sum, loss_batches):
    """What evaluate_forget_set returns, as far as the loop reads it."""
    df = pd.DataFrame({
        "id": data.doc_ids[idx].numpy(), "prefix": "p", "reference": "r", "candidate": "c",
        "bleu": bleu, "P": f1, "R": f1, "F1": f1, "diff": 1.0, "entropy": 1.0, "ma": ma, "el_10": el, "loss": loss,
    })
    return SimpleNamespace(per_sample=df, flags=flags, loss_sum=loss_sum, loss_batches=loss_batches)


class ScriptedEval:
    """Returns the scripted F1/BLEU/MA/EL of validation number k (k = 0, 1, ...)."""

    def __init__(self, script):
        self.script = script
        self.calls = 0

    def __call__(self, model, tok, gpt2, data, *, indices, f1, bleu, **kw):
        s = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        idx = list(indices)
        f1s, bleus = np.asarray(s["F1"], float)[idx], np.asarray(s["bleu"], float)[idx]
        flags = ((f1s >= f1) & (bleus >= bleu)).astype(np.int64)
        return _result(data, idx, flags, f1s, bleus, s["ma"], s["el"], 1.0, 2.0, 1)


class LossEval:
    """Weights-dependent stand-in: flag = per-sample LM loss below ``thr`` (gradient ascent
    unflags samples over time); F1 = BLEU = flag; MA = EL = exp(-loss). Cheap and deterministic."""

    def __init__(self, thr: float):
        self.thr = thr

    @torch.no_grad()
    def __call__(self, model, tok, gpt2, data, *, indices, **kw):
        idx = list(indices)
        was = model.training
        model.eval()
        x, y = data.input_ids.to(model.device), data.labels.to(model.device)
        losses = np.asarray([lm_loss(model(input_ids=x[i : i + 1]).logits, y[i : i + 1]).item() for i in idx])
        model.train(was)
        flags = (losses < self.thr).astype(np.int64)
        f1 = flags.astype(float)
        return _result(data, idx, flags, f1, f1, np.exp(-losses), np.exp(-losses), losses,
                       float(losses.sum()), len(idx))


def make_loop(out, data, evaluator, *, model=None, engine=None, reference=None, **cfg_kw) -> ICULoop:
    """An ICULoop (split exp0, lr 1e-3, batch 2, LEN-token targets unless ``cfg_kw`` says otherwise)
    writing into ``out``. Without ``engine`` it trains ``model`` (default ``tiny_neo()``) with a CPU
    TorchEngine. The KL reference is a frozen copy of ``reference``; by default of that model, or
    none when the caller brings its own engine."""
    if engine is None and model is None:
        model = tiny_neo()
    if reference is None and engine is None:
        reference = model
    ref = None if reference is None else copy.deepcopy(reference).requires_grad_(False)
    cfg_kw = {"lr": 1e-3, "batch_size": 2, "target_length": LEN, **cfg_kw}
    cfg = LoopConfig(exp="exp0", model_name="tiny", dir=str(out), **cfg_kw)
    if engine is None:
        engine = TorchEngine(model, cfg.lr, torch.device("cpu"))
    return ICULoop(engine, cfg, tokenizer=None, gpt2_tokenizer=None, dataset=data, reference_model=ref,
                   scorer=None, evaluator=evaluator)


# --------------------------------------------------------------------------- tiny Llama

# SmolLM2's special tokens and ids: <|endoftext|> 0, <|im_start|> 1 (bos), <|im_end|> 2 (eos)
LLAMA_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_BOS, LLAMA_EOS = 1, 2
LLAMA_VOCAB = 512


def tiny_llama_tokenizer(add_bos: bool = False, vocab_size: int = LLAMA_VOCAB):
    """A byte-level BPE of ``vocab_size`` ids trained on generated family text (its ids are not
    GPT-2's), wrapped as the hub ships SmolLM2's: bos <|im_start|> (1), eos <|im_end|> (2).
    ``add_bos``: a post-processor puts bos before every encoding, as Llama-2 tokenizers do.
    Left padding with pad = eos, as icu.models.load_tokenizer sets it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for _, t in generate_families(60, 3, seed=1234, sentences_per_doc=18)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(LLAMA_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        bos = LLAMA_SPECIALS[LLAMA_BOS]
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, LLAMA_BOS)])
    else:
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=LLAMA_SPECIALS[LLAMA_BOS],
                                  eos_token=LLAMA_SPECIALS[LLAMA_EOS], unk_token=None)
    tok.model_max_length = 2048
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def tiny_llama(seed: int = 0, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, vocab_size: int = LLAMA_VOCAB, **config):
    """A random LlamaForCausalLM in eval mode (SmolLM2's architecture in small: grouped-query
    attention, RoPE, RMSNorm, SiLU MLP, tied input/output embeddings, bos 1, eos 2), built right
    after ``torch.manual_seed(seed)``. A wide init (std 0.2) keeps greedy decisions off near ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
              num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
              max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=LLAMA_BOS,
              eos_token_id=LLAMA_EOS, initializer_range=0.2)
    kw.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    return model


def save_tiny_llama(path, seed: int = 0, *, add_bos: bool = False, model=None, **shape) -> str:
    """``tiny_llama(seed, **shape)`` (or ``model``) saved in ``path`` with its own tokenizer
    (``tiny_llama_tokenizer(add_bos)``): a --model_name folder."""
    (model if model is not None else tiny_llama(seed, **shape)).save_pretrained(str(path))
    tiny_llama_tokenizer(add_bos).save_pretrained(str(path))
    return str(path)


def memorize(model, input_ids, attention_mask, steps: int = 80, lr: float = 1e-2):
    """Train ``model`` in place on the rows (full batch, Adam) so that it partly memorizes them:
    the metrics then both follow and leave the text. Returns the model in eval mode."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
