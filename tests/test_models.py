"""Loading tokenizers and models: built-ins, offline fallback, dropout, padding, dtype."""

from __future__ import annotations

import logging

import pytest
import torch

from icu import models
from icu.errors import IcuError
from tiny import save_tiny_neo


def test_builtin_gpt2_ids():
    tok = models.load_tokenizer(models.BUILTIN_GPT2)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256 and len(tok) == 50257
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "left"


def test_builtin_gpt2_matches_shared_bpe_files(shared_dir):
    """The packaged BPE equals the reference copy in ../shared/tokenizer/gpt2: the vocabulary
    (encoder.json = vocab.json) and the merges in their order (vocab.bpe = merges.txt; the
    packaged file starts with a "#version" line, the reference copy does not)."""
    import json
    import os

    vocab_file, merges_file = models.gpt2_bpe_files()
    reference = os.path.join(shared_dir, "tokenizer", "gpt2")
    with open(vocab_file, encoding="utf-8") as fh:
        packaged = json.load(fh)
    with open(os.path.join(reference, "vocab.json"), encoding="utf-8") as fh:
        assert packaged == json.load(fh)

    def merges(path):
        with open(path, encoding="utf-8") as fh:
            return [line for line in fh.read().splitlines() if line and not line.startswith("#version")]

    packaged_merges = merges(merges_file)
    assert len(packaged_merges) == 50000  # GPT-2's merges: 50257 tokens = 256 bytes + 50000 merges + eos
    assert packaged_merges == merges(os.path.join(reference, "merges.txt"))


def test_left_padding_pads_with_eos():
    tok = models.load_tokenizer(models.BUILTIN_GPT2)
    enc = tok(["Hello world", "Hello"], padding=True)
    assert enc["input_ids"][1] == [50256, 15496]
    assert enc["attention_mask"][1] == [0, 1]


def test_gpt_neo_name_falls_back_offline_with_one_warning(caplog):
    models._warned.clear()
    icu_logger = logging.getLogger("icu")
    # the trainers' setup_logging stops propagation to the root logger: listen on "icu" itself
    icu_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="icu"):
            tok = models.load_tokenizer("EleutherAI/gpt-neo-125m")
            tok2 = models.load_tokenizer("EleutherAI/gpt-neo-125m")
    finally:
        icu_logger.removeHandler(caplog.handler)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok2.pad_token == "<|endoftext|>"
    warnings = {id(r) for r in caplog.records if "builtin:gpt2" in r.getMessage()}  # one record, maybe seen twice
    assert len(warnings) == 1


def test_unknown_tokenizer_offline_is_a_clear_error():
    with pytest.raises(IcuError, match="builtin:gpt2"):
        models.load_tokenizer("someone/unknown-tokenizer")


def test_unknown_model_offline_is_a_clear_error():
    with pytest.raises(IcuError, match="icu.toy"):
        models.load_model("someone/not-a-model")


def _save(config, tmp_path, cls):
    torch.manual_seed(0)
    model = cls(config)
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def test_dropout_off_gpt_neo(tmp_path):
    path = save_tiny_neo(tmp_path, vocab_size=100, num_layers=2, attention_types=[[["global", "local"], 1]],
                         max_position_embeddings=32, resid_dropout=0.3, embed_dropout=0.3, attention_dropout=0.3)
    model = models.load_model(path)
    c = model.config
    assert (c.resid_dropout, c.embed_dropout, c.attention_dropout) == (0.0, 0.0, 0.0)
    assert not model.training
    # dropout really off: two train-mode forwards agree
    model.train()
    x = torch.randint(0, 100, (2, 8))
    assert torch.equal(model(x).logits, model(x).logits)


def test_dropout_off_opt_and_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    opt = OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=32,
                    dropout=0.2, attention_dropout=0.2, activation_dropout=0.2)
    m = models.load_model(_save(opt, tmp_path / "opt", OPTForCausalLM))
    assert (m.config.dropout, m.config.attention_dropout, m.config.activation_dropout) == (0.0, 0.0, 0.0)
    g2 = GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                    resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)
    m = models.load_model(_save(g2, tmp_path / "gpt2", GPT2LMHeadModel))
    assert (m.config.resid_pdrop, m.config.embd_pdrop, m.config.attn_pdrop) == (0.0, 0.0, 0.0)


def test_dtype_option(tmp_path):
    path = save_tiny_neo(tmp_path, vocab_size=100, max_position_embeddings=32)
    assert models.load_model(path, dtype="bf16").dtype == torch.bfloat16
    assert models.load_model(path).dtype == torch.float32
    with pytest.raises(IcuError, match="fp32, bf16, fp16"):
        models.parse_dtype("int8")


def test_minilm_resolves_offline_to_packaged_copy():
    path = models.resolve_embedder("all-MiniLM-L6-v2")
    assert path == models.builtin_minilm_path()
    bert_path, layers = models.resolve_bertscore_model("bert-base-uncased")
    assert bert_path == models.builtin_minilm_path() and layers == 6


# --------------------------------------------------------------------------- missing or damaged models


def test_missing_local_model_folder_says_so(tmp_path):
    missing = str(tmp_path / "models" / "neo")
    for name in (missing, "./no/such/model", "datasets/toy/nosuch"):
        with pytest.raises(IcuError, match=f"model folder {name} does not exist"):
            models.load_model(name)
    with pytest.raises(IcuError, match=f"folder {missing} does not exist"):
        models.load_tokenizer(missing)
    assert not models.looks_like_path("EleutherAI/gpt-neo-125m")  # a hub id still goes to the hub


def _tiny_saved(tmp_path):
    return save_tiny_neo(tmp_path / "m", vocab_size=100, max_position_embeddings=32)


@pytest.mark.parametrize("damage", ["truncated", "garbled", "missing"])
def test_damaged_weights_are_one_line_naming_the_file(tmp_path, damage):
    import os

    path = _tiny_saved(tmp_path)
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    if damage == "truncated":
        open(weights, "wb").write(data[: len(data) // 2])
    elif damage == "garbled":
        open(weights, "wb").write(bytes(reversed(data)))
    else:
        os.remove(weights)
    with pytest.raises(IcuError) as exc:
        models.load_model(path)
    msg = str(exc.value)
    assert "\n" not in msg and "save_pretrained" in msg
    assert (weights in msg) if damage != "missing" else ("no model.safetensors" in msg and path in msg)


def test_garbled_config_names_config_json(tmp_path):
    import os

    path = _tiny_saved(tmp_path)
    with open(os.path.join(path, "config.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(IcuError, match="config.json is missing or unreadable"):
        models.load_model(path)


# --------------------------------------------------------------------------- tokenizer fit


def shifted_gpt2_tokenizer(folder):
    """GPT-2's BPE with every id moved up by one (eos 50256 -> 0): same text, other ids. Built
    offline by editing a saved copy of the packaged tokenizer."""
    import json
    import os

    from transformers import AutoTokenizer

    models.builtin_gpt2_tokenizer().save_pretrained(folder)
    path = os.path.join(folder, "tokenizer.json")
    with open(path, encoding="utf-8") as fh:
        spec = json.load(fh)
    size = len(spec["model"]["vocab"])
    spec["model"]["vocab"] = {t: (i + 1) % size for t, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = (added["id"] + 1) % size
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("Hello world")["input_ids"] == [15497, 996] and tok.eos_token_id == 0
    return tok


@pytest.fixture(scope="module")
def toy_rows_model(toy_world):
    import numpy as np

    rows = np.load(toy_world["train_file"])[np.asarray(toy_world["meta"]["target_ids"][:64])]
    model = models.load_model(toy_world["model"])
    return rows, model, models.load_tokenizer(toy_world["model"])


def test_toy_world_passes_the_tokenizer_check(toy_rows_model):
    rows, model, tok = toy_rows_model
    gpt2 = models.load_tokenizer(models.BUILTIN_GPT2)
    fit = models.check_tokenizer_fit(rows, gpt2, tok, model, gpt2_name="builtin:gpt2", tokenizer_name="toy")
    assert fit["round_trip_share"] >= models.ROUND_TRIP_WARN and fit["rows_checked"] == len(rows)
    assert fit["tokenizer_size"] == fit["embedding_rows"] == 50257


def test_mismatched_tokenizers_are_refused_with_numbers(toy_rows_model, tmp_path):
    import numpy as np

    rows, model, tok = toy_rows_model
    gpt2 = models.load_tokenizer(models.BUILTIN_GPT2)
    shifted = shifted_gpt2_tokenizer(str(tmp_path / "shifted"))
    # a wrong --gpt2_name: the rows would decode to other text
    with pytest.raises(IcuError, match=r"--gpt2_name shifted: 50257 of GPT-2's 50257 tokens have other ids"):
        models.check_tokenizer_fit(rows, shifted, tok, model, gpt2_name="shifted", tokenizer_name="toy")
    # another model's tokenizer: the model would read other ids
    with pytest.raises(IcuError, match="its eos id 0 differs from the model's 50256"):
        models.check_tokenizer_fit(rows, gpt2, shifted, model, gpt2_name="gpt2", tokenizer_name="shifted")
    # rows that are not GPT-2-tokenized text (random ids) do not survive the round trip
    noise = np.random.default_rng(0).integers(0, 50000, size=rows.shape).astype(np.uint16)
    with pytest.raises(IcuError, match=r"only \d+% of \d+ forget-set rows decode"):
        models.check_tokenizer_fit(noise, gpt2, tok, model, gpt2_name="gpt2", tokenizer_name="toy")
