"""compare.py's per-method hyper-parameters: the shipped defaults, a user's file on top, checks.

Layout (YAML or JSON)::

    common:  {max_epochs: 50, acc: 0.5994, el: 0.0499}   # every method
    methods:
      icu: {lr: 5.0e-6, uw: 1.0, lw: 0.5, kl: 1.0}       # overrides "common" for icu
      ga:  {lr: 1.0e-6, uw: 0.5}

Keys are trainer flag names; values are checked and converted with the trainer's own argparse
types, so a typo or a wrong type fails before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..errors import IcuError

# The repository's root: the scripts compare.py runs and the shipped config live there.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "config", "compare.yaml")
ORIGINAL = "original"
# Set by compare.py itself for every run (from its own flags); a config file may not set them.
RESERVED_KEYS = frozenset({
    "exp", "data_dir", "model_name", "tokenizer_name", "gpt2_name", "bert_name", "dtype", "device",
    "dir", "prefix_length", "suffix_length", "target_length", "resume", "overwrite", "local_rank",
    "method", "num_workers", "help",
})
TOP_KEYS = ("common", "methods")


@dataclass
class MethodConfig:
    """The hyper-parameters of every method, as read from the files (values not yet checked)."""

    common: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_method(self, name: str) -> dict[str, Any]:
        return {**self.common, **self.methods.get(name, {})}


def read_config_file(path: str) -> MethodConfig:
    """Read one YAML/JSON file into a MethodConfig; IcuError on a missing or malformed file."""
    if not os.path.isfile(path):
        raise IcuError(f"--config {path!r} not found; see config/compare.yaml for the format")
    try:
        with open(path, encoding="utf-8") as fh:
            if path.endswith(".json"):
                raw = json.load(fh)
            else:
                import yaml

                raw = yaml.safe_load(fh)
    except Exception as exc:  # yaml/json parse errors have many types; all mean "fix the file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IcuError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({first})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise IcuError(f"--config {path}: expected a mapping with keys {' and '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise IcuError(f"--config {path}: unknown top-level key(s) {', '.join(unknown)}; "
                       f"use {' and '.join(TOP_KEYS)} (see config/compare.yaml)")
    common = raw.get("common") or {}
    methods = raw.get("methods") or {}
    if not isinstance(common, dict) or not isinstance(methods, dict):
        raise IcuError(f"--config {path}: 'common' and 'methods' must be mappings")
    for name, section in methods.items():
        if not isinstance(section, dict):
            raise IcuError(f"--config {path}: methods.{name} must be a mapping of flag: value")
    return MethodConfig(dict(common), {str(k): dict(v or {}) for k, v in methods.items()})


def merge_configs(base: MethodConfig, top: MethodConfig) -> MethodConfig:
    """``top``'s keys override ``base``'s, section by section."""
    methods = {name: dict(keys) for name, keys in base.methods.items()}
    for name, keys in top.methods.items():
        methods.setdefault(name, {}).update(keys)
    return MethodConfig({**base.common, **top.common}, methods)


def trainer_methods() -> list[str]:
    """The methods the trainers accept (``--method``)."""
    from ..methods import METHOD_NAMES

    return list(METHOD_NAMES)


def known_methods() -> list[str]:
    return [ORIGINAL, *trainer_methods()]


def parse_methods(text: str) -> list[str]:
    """``"original,ga,icu"`` -> ["original", "ga", "icu"]; IcuError listing the known methods."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    known = known_methods()
    if not names:
        raise IcuError(f"--methods is empty; choose from {','.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise IcuError(f"--methods: unknown method(s) {', '.join(unknown)}; known: {','.join(known)}")
    return names


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != argparse.SUPPRESS}


def _convert(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A config value through the flag's own type and choices (YAML reads 5e-6 as a string)."""
    if action.nargs == 0:  # a store_true switch
        if not isinstance(value, bool):
            raise IcuError(f"{where}: {key} is a switch; give true or false (got {value!r})")
        return value
    if isinstance(value, (dict, list)) or value is None:
        raise IcuError(f"{where}: {key} needs one value (got {value!r})")
    try:
        converted = action.type(str(value)) if action.type else str(value)
    except (TypeError, ValueError):
        raise IcuError(f"{where}: {key} = {value!r} is not a valid {getattr(action.type, '__name__', 'value')}") from None
    if action.choices is not None and converted not in action.choices:
        raise IcuError(f"{where}: {key} = {value!r}; choose from {', '.join(map(str, action.choices))}")
    return converted


def check_section(keys: dict[str, Any], parser: argparse.ArgumentParser, where: str) -> dict[str, Any]:
    """Checked, converted copy of one section; IcuError naming the first bad key and the fix."""
    actions = _actions(parser)
    out = {}
    for key, value in keys.items():
        if key in RESERVED_KEYS:
            raise IcuError(f"{where}: {key} is set by compare.py's own flags; remove it from the config")
        if key not in actions:
            close = sorted(a for a in actions if a not in RESERVED_KEYS)
            raise IcuError(f"{where}: unknown key {key!r}; the trainer's flags are: {', '.join(close)}")
        out[key] = _convert(actions[key], key, value, where)
    return out


def resolve_methods(
    cfg: MethodConfig, methods: Iterable[str], parser: argparse.ArgumentParser, user_file: Optional[str]
) -> dict[str, dict[str, Any]]:
    """Checked hyper-parameters of every method to run (``original`` has none)."""
    from ..methods import HYPERPARAMETERS, get_method

    where = f"--config {user_file}" if user_file else f"config {DEFAULT_CONFIG}"
    common = check_section(cfg.common, parser, f"{where} (common)")
    shared = sorted(set(common) & set(HYPERPARAMETERS))
    if shared:
        raise IcuError(f"{where} (common): {', '.join(shared)} belong under methods.<name> (each method "
                       "reads only its own loss weights)")
    out = {}
    for name in methods:
        if name == ORIGINAL:
            continue
        section = check_section(cfg.methods.get(name, {}), parser, f"{where} (methods.{name})")
        unused = sorted(k for k in section if k in HYPERPARAMETERS and k not in get_method(name).uses)
        if unused:
            raise IcuError(f"{where} (methods.{name}): {name} does not use {', '.join(unused)} "
                           f"(it reads {', '.join(get_method(name).uses)}); remove the key")
        out[name] = {**common, **section}
    return out


def load_method_config(
    user_file: Optional[str], parser: argparse.ArgumentParser, default_file: str = DEFAULT_CONFIG
) -> MethodConfig:
    """The shipped defaults with ``user_file`` on top; a user section for a method nobody knows
    is an error (a typo would otherwise silently keep the defaults)."""
    cfg = read_config_file(default_file) if os.path.isfile(default_file) else MethodConfig()
    if not user_file:
        return cfg
    user = read_config_file(user_file)
    known = set(trainer_methods()) | set(cfg.methods)
    stray = sorted(set(user.methods) - known)
    if stray:
        raise IcuError(f"--config {user_file}: unknown method section(s) {', '.join(stray)}; "
                       f"known: {','.join(sorted(known))}")
    return merge_configs(cfg, user)


def flag_tokens(params: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """``{"lr": 1e-6, "x": True}`` -> ["--lr", "1e-06", "--x"] (switches only when true)."""
    actions = _actions(parser)
    tokens: list[str] = []
    for key, value in params.items():
        flag = actions[key].option_strings[0]
        if actions[key].nargs == 0:
            tokens += [flag] if value else []
        else:
            tokens += [flag, repr(value) if isinstance(value, float) else str(value)]
    return tokens
