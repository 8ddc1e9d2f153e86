"""DeepSpeed JSON configs: load, validate, and reconcile them with the ICU flags.

The reference DeepSpeed trainer passed its JSON to ``deepspeed.initialize`` as is, so the
optimizer's lr came from the JSON (2e-6) and ``--lr`` was silently ignored, and the batch keys
were whatever the file said. Here the flags are the one source of truth:

* ``optimizer.params.lr`` is set to ``--lr`` (a different value in the JSON is reported);
* ``train_micro_batch_size_per_gpu`` is ``--batch_size``; ``gradient_accumulation_steps`` is 1
  unless the JSON gives it; ``train_batch_size`` = micro x world size x accumulation. A JSON that
  fixes ``train_batch_size`` to something else is an error that says what to change;
* the optimizer is Adam with the reference's betas (0.9, 0.98), eps 1e-8, no weight decay,
  unless the JSON says otherwise; no LR scheduler (the reference has none); no gradient
  clipping unless the JSON sets ``gradient_clipping`` (DeepSpeed 0.19's default is 1.0).

Every problem is an :class:`IcuError` raised before anything is written, with the file name and
the fix. Non-fatal adjustments come back as notes for the trainer to log.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .engine import ADAM_BETAS
from .errors import IcuError

ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
ADAM_TYPES = ("adam", "adamw")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed prints a progress line every `steps_per_print` steps (default 10); ICU's own progress
# bar and log already say the same, so a config without the key gets a quiet value.
QUIET_STEPS_PER_PRINT = 1_000_000


@dataclass
class ReconciledConfig:
    """The dict to hand to ``deepspeed.initialize`` and what was changed on the way."""

    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    zero_stage: int = 0

    @property
    def precision(self) -> str:
        if _enabled(self.config.get("bf16")):
            return "bf16"
        if _enabled(self.config.get("fp16")):
            return "fp16"
        return "fp32"


def load_ds_config(path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON file; a missing file, bad JSON or a non-object is an IcuError."""
    if not path:
        raise IcuError("--deepspeed_config is empty; pass a DeepSpeed JSON such as config/deepspeed3.json")
    if not os.path.isfile(path):
        hint = ""
        if os.path.isdir("config"):
            names = sorted(n for n in os.listdir("config") if n.endswith(".json"))
            if names:
                hint = f" (config/ holds: {', '.join(names)})"
        raise IcuError(f"--deepspeed_config {path!r} not found{hint}")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except json.JSONDecodeError as exc:
        raise IcuError(
            f"--deepspeed_config {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError:
        raise IcuError(f"--deepspeed_config {path}: not a UTF-8 text file; it must be a JSON object") from None
    if not isinstance(cfg, dict):
        raise IcuError(
            f"--deepspeed_config {path}: the top level must be a JSON object "
            f"({{...}}), found {type(cfg).__name__}"
        )
    return cfg


def _enabled(section: Any) -> bool:
    """DeepSpeed's `"bf16": {"enabled": true}` (a bare bool is accepted too)."""
    if isinstance(section, dict):
        return bool(section.get("enabled", False))
    return bool(section)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _batch_value(cfg: dict, key: str, source: str) -> Optional[int]:
    """A batch key's value, None when absent or "auto" (ICU computes it)."""
    value = cfg.get(key)
    if value is None or value == "auto":
        return None
    if not _is_int(value) or value < 1:
        raise IcuError(f"{source}: {key} must be a positive integer or \"auto\" (got {value!r})")
    return value


def _offload_device(zero: dict, key: str, source: str) -> str:
    section = zero.get(key)
    if section is None:
        return "none"
    if not isinstance(section, dict):
        raise IcuError(f"{source}: zero_optimization.{key} must be an object like {{\"device\": \"cpu\"}}")
    device = str(section.get("device", "none")).lower()
    if device not in OFFLOAD_DEVICES:
        raise IcuError(
            f"{source}: zero_optimization.{key}.device must be one of {', '.join(OFFLOAD_DEVICES)} (got {device!r})"
        )
    if device == "nvme" and not section.get("nvme_path"):
        raise IcuError(f"{source}: zero_optimization.{key} offloads to nvme but sets no nvme_path")
    return device


def zero_stage(cfg: dict, source: str = "DeepSpeed config") -> int:
    """The ZeRO stage of ``cfg`` (0 when there is no zero_optimization section)."""
    zero = cfg.get("zero_optimization")
    if zero is None:
        return 0
    if isinstance(zero, bool):  # DeepSpeed's legacy form: true means stage 1
        return 1 if zero else 0
    if not isinstance(zero, dict):
        raise IcuError(f"{source}: zero_optimization must be an object like {{\"stage\": 2}}")
    stage = zero.get("stage", 0)
    if not _is_int(stage) or stage not in ZERO_STAGES:
        raise IcuError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    return stage


def validate_ds_config(cfg: dict, source: str = "DeepSpeed config") -> int:
    """Structural checks a model-independent config can fail; returns the ZeRO stage."""
    stage = zero_stage(cfg, source)
    zero = cfg.get("zero_optimization") if isinstance(cfg.get("zero_optimization"), dict) else {}
    opt_dev = _offload_device(zero, "offload_optimizer", source)
    if zero.get("cpu_offload") is True:  # deprecated spelling of offload_optimizer: cpu
        opt_dev = "cpu"
    par_dev = _offload_device(zero, "offload_param", source)
    if zero.get("cpu_offload_param") is True:
        par_dev = "cpu"
    if opt_dev != "none" and stage == 0:
        raise IcuError(
            f"{source}: offload_optimizer needs ZeRO stage 1, 2 or 3, but zero_optimization.stage is 0; "
            "set \"stage\": 2 (the paper's) or remove offload_optimizer"
        )
    if par_dev != "none" and stage != 3:
        raise IcuError(
            f"{source}: offload_param needs ZeRO stage 3, but zero_optimization.stage is {stage}; "
            "set \"stage\": 3 (see config/deepspeed_zero3.json) or remove offload_param"
        )
    if _enabled(cfg.get("bf16")) and _enabled(cfg.get("fp16")):
        raise IcuError(f"{source}: bf16 and fp16 are both enabled; enable at most one")
    for key in BATCH_KEYS:
        _batch_value(cfg, key, source)
    opt = cfg.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict):
            raise IcuError(f"{source}: optimizer must be an object like {{\"type\": \"Adam\", \"params\": {{...}}}}")
        kind = str(opt.get("type", "Adam"))
        if kind.lower() not in ADAM_TYPES:
            raise IcuError(
                f"{source}: optimizer type {kind!r}: ICU trains with Adam (betas 0.9, 0.98) as the reference "
                "does; use \"type\": \"Adam\" or remove the optimizer section"
            )
        if not isinstance(opt.get("params", {}), dict):
            raise IcuError(f"{source}: optimizer.params must be an object")
    if cfg.get("scheduler") is not None:
        raise IcuError(
            f"{source}: has a scheduler section; ICU uses a constant learning rate (--lr) as the "
            "reference does, so remove \"scheduler\""
        )
    return stage


def _reconcile_batch(out: dict, notes: list[str], micro: int, world_size: int, source: str) -> None:
    """Batch sizes: --batch_size per rank, accumulation 1 unless the JSON asks, global = product."""
    json_micro = _batch_value(out, "train_micro_batch_size_per_gpu", source)
    if json_micro is not None and json_micro != micro:
        notes.append(
            f"{source}: train_micro_batch_size_per_gpu {json_micro} replaced by --batch_size {micro}"
        )
    gas = _batch_value(out, "gradient_accumulation_steps", source)
    json_tbs = _batch_value(out, "train_batch_size", source)
    per_step = micro * world_size
    if json_tbs is not None:
        if json_tbs % per_step != 0:
            raise IcuError(
                f"{source}: train_batch_size {json_tbs} cannot be split over {world_size} ranks with "
                f"--batch_size {micro} per rank ({json_tbs} is not a multiple of {per_step}); set "
                f"train_batch_size to {per_step} (or remove it), or pass --batch_size so that "
                f"--batch_size x {world_size} divides {json_tbs}"
                + (f", or run on {json_tbs // micro} ranks" if json_tbs % micro == 0 else "")
            )
        k = json_tbs // per_step
        if gas is not None and k != gas:
            raise IcuError(
                f"{source}: train_batch_size {json_tbs} != --batch_size {micro} x {world_size} ranks x "
                f"gradient_accumulation_steps {gas} = {per_step * gas}; set train_batch_size to "
                f"{per_step * gas} (or remove it and ICU computes it)"
            )
        if gas is None and k != 1:
            raise IcuError(
                f"{source}: train_batch_size {json_tbs} = --batch_size {micro} x {world_size} ranks x {k} "
                f"would need {k} gradient accumulation steps, and ICU accumulates only when asked; set "
                f"\"gradient_accumulation_steps\": {k}, or set train_batch_size to {per_step}, or pass "
                f"--batch_size {json_tbs // world_size if json_tbs % world_size == 0 else micro}"
            )
    gas = gas or 1
    out["train_micro_batch_size_per_gpu"] = micro
    out["gradient_accumulation_steps"] = gas
    out["train_batch_size"] = per_step * gas


def _reconcile_optimizer(out: dict, notes: list[str], lr: float, on_cpu: bool, source: str) -> None:
    """Adam with --lr and the reference's betas; no scheduler (validated before)."""
    opt = out.setdefault("optimizer", {"type": "Adam"})
    opt.setdefault("type", "Adam")
    params = opt.setdefault("params", {})
    json_lr = params.get("lr")
    if json_lr is not None and json_lr != lr:
        notes.append(
            f"{source}: optimizer lr {json_lr} replaced by --lr {lr} (the reference silently used the JSON's)"
        )
    params["lr"] = lr
    if "betas" not in params:
        params["betas"] = list(ADAM_BETAS)
    elif [float(b) for b in params["betas"]] != list(ADAM_BETAS):
        notes.append(f"{source}: Adam betas {params['betas']} differ from the reference's {list(ADAM_BETAS)}")
    params.setdefault("eps", 1e-8)
    params.setdefault("weight_decay", 0.0)
    if opt["type"].lower() == "adam":
        # DeepSpeed turns "Adam" into AdamW unless told otherwise; with weight_decay 0 the two
        # agree, but say plain Adam so a weight decay in the JSON means what it says.
        params.setdefault("adam_w_mode", False)
    if on_cpu and not params.get("torch_adam", False):
        # DeepSpeed's own Adams (FusedAdam, DeepSpeedCPUAdam) are compiled ops; torch.optim.Adam
        # needs no compiler and is what the single-device trainer uses. It works with ZeRO 0-3
        # and with offload_optimizer in DeepSpeed 0.19.
        params["torch_adam"] = True
        notes.append(f"{source}: CPU run, so the optimizer is torch.optim.Adam (\"torch_adam\": true)")


def _reconcile_clipping(out: dict, notes: list[str], source: str) -> None:
    """No gradient clipping: the reference and the single-device trainer clip nothing, and
    DeepSpeed 0.19 clips to norm 1.0 when the key is absent, which alone changes every update."""
    # DeepSpeed 0.19 clips to norm 1.0 when the key is absent, which alone changes every update.
    clip = out.get("gradient_clipping")
    if clip is None:
        out["gradient_clipping"] = 0.0
    elif clip:
        notes.append(f"{source}: gradient_clipping {clip} kept; the reference clips no gradients")


def _reconcile_precision(out: dict, notes: list[str], on_cpu: bool, model_dtype: str, source: str) -> None:
    """fp16 is refused on CPU; bf16 there is kept with a note; --dtype must match the JSON's."""
    if on_cpu and _enabled(out.get("fp16")):
        raise IcuError(
            f"{source}: fp16 training is not supported on CPU; disable fp16 (bf16 or fp32 work on CPU)"
        )
    if on_cpu and _enabled(out.get("bf16")):
        notes.append(
            f"{source}: bf16 kept on CPU (DeepSpeed 0.19 trains bf16 there); it is slower than fp32 on "
            "most CPUs and does not match an fp32 run exactly"
        )
    precision = ReconciledConfig(out).precision
    if model_dtype in ("bf16", "fp16") and precision != model_dtype:
        raise IcuError(
            f"--dtype {model_dtype} but {source} trains in {precision}; DeepSpeed keeps fp32 master "
            f"weights only when the JSON enables it: set \"{model_dtype}\": {{\"enabled\": true}} in the "
            "JSON, or use --dtype fp32 (DeepSpeed casts the weights itself)"
        )


def reconcile_ds_config(
    cfg: dict,
    *,
    lr: float,
    batch_size: int,
    world_size: int,
    on_cpu: bool,
    model_dtype: str = "fp32",
    source: str = "DeepSpeed config",
) -> ReconciledConfig:
    """Return a copy of ``cfg`` consistent with the flags (see the module docstring)."""
    stage = validate_ds_config(cfg, source)
    out = copy.deepcopy(cfg)
    notes: list[str] = []
    _reconcile_batch(out, notes, batch_size, world_size, source)
    _reconcile_optimizer(out, notes, lr, on_cpu, source)
    _reconcile_clipping(out, notes, source)
    _reconcile_precision(out, notes, on_cpu, model_dtype, source)
    out.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    return ReconciledConfig(config=out, notes=notes, zero_stage=stage)


def build_ds_config(
    path: str,
    *,
    lr: float,
    batch_size: int,
    world_size: int,
    on_cpu: bool,
    model_dtype: str = "fp32",
) -> ReconciledConfig:
    """Load ``path`` and reconcile it with the flags (the DeepSpeed trainer's entry point)."""
    cfg = load_ds_config(path)
    return reconcile_ds_config(
        cfg, lr=lr, batch_size=batch_size, world_size=world_size, on_cpu=on_cpu,
        model_dtype=model_dtype, source=path,
    )
