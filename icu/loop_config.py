"""The loop's settings, declared once, and the name of the folder a finished run saves.

Each :func:`icu.cli.setting` field of :class:`LoopConfig` is also a trainer flag with the same
name, default and help (``icu.cli.add_settings_args`` builds the flags, ``settings_from_args``
the config), so a default lives in one place.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from .cli import parse_int_list, setting
from .methods import METHOD_NAMES, get_method
from .metrics import EL_START, el_column

REFINE_MODES = ("update", "off")
EL_WHEN = ("always", "needed")
AUTOCAST_MODES = ("off", "bf16")


@dataclass
class LoopConfig:
    """The run's settings. Each :func:`setting` field is also a trainer flag (same name, this
    default, this help): the one place they are declared. exp, model_name, dir, target_length,
    batch_size and num_workers come from the shared data/model/runtime flags."""

    exp: str
    model_name: str
    dir: str
    method: str = setting("icu", f"unlearning method: {', '.join(METHOD_NAMES)} (docs/methods.md)")
    refine: str = setting("update", "update: train only the samples the last validation flagged "
                          "(iterative refinement); off: every sample, every epoch",
                          choices=REFINE_MODES)
    lr: float = setting(5e-6, "Adam learning rate")
    uw: float = setting(1.0, "weight of the unlearn (ascent) term")
    lw: float = setting(0.5, "weight of the learn (NLL) term (npo, simnpo: default 0)")
    kl: float = setting(1.0, "weight of the KL term (npo: default 0)")
    beta: float = setting(0.1, "inverse temperature of npo / simnpo")
    gamma: float = setting(0.0, "margin of simnpo")
    f1: float = setting(0.3, "BERTScore F1 threshold of the flag rule")
    bleu: float = setting(0.01, "BLEU threshold of the flag rule")
    acc: float = setting(0.5994, "MA threshold of the stop rule")
    el: float = setting(0.0499, "EL threshold of the stop rule")
    el_ns: tuple[int, ...] = setting((10,), "comma-separated n of EL_n (stop when any is below --el)",
                                     flag="el_n", parse=lambda v: parse_int_list(v, "el_n"), type=str)
    el_when: str = setting("always", "always: EL_n at every validation (the reference); needed: only at "
                           "validations that can end the run (MA <= --acc, nothing flagged, or "
                           "--max_epochs reached), recorded as skipped elsewhere: same stops, flags "
                           "and weights, much cheaper validation", choices=EL_WHEN)
    heldout: Optional[str] = setting(None, "(N, 200) uint16 .npy of rows never trained on: their LM loss "
                                     "at every validation (history's heldout_loss / heldout_se, per row "
                                     "in heldout.csv)", type=str)
    el_start: int = setting(EL_START, "first prefix length of EL_n: 150 = ICU's definition (default), "
                            "1 = Knowledge Unlearning's (docs/method.md#extraction-likelihood-el_n)")
    target_length: int = 200
    batch_size: int = 8
    eval_batch_size: Optional[int] = setting(None, "validation batch (default --batch_size)", type=int)
    num_workers: int = 0
    max_epochs: int = setting(50, "stop after this many epochs")
    seed: int = setting(42, "seed of the sample order and of everything random")
    autocast: str = setting("off", "bf16: run the training step's forward passes under bfloat16 autocast "
                            "(weights, optimizer and every validation stay fp32); about 2x faster on "
                            "CPUs with AVX512-BF16/AMX and on GPUs, numbers differ by bf16 rounding",
                            choices=AUTOCAST_MODES)
    kl_mode: str = setting("frozen", "frozen: original model's p0 on the fly from a frozen copy "
                           "(memory does not grow with N); cached: the reference's precomputed "
                           "N x L x V table", choices=("frozen", "cached"))
    save_model: bool = True

    @property
    def el_keys(self) -> list[str]:
        # el_10 for ICU's definition, el_10_from1 for KU's: the name says which one it is
        return [el_column(n, self.el_start) for n in self.el_ns]


def final_model_dir(cfg: LoopConfig, epoch: int) -> str:
    """ICU with refinement keeps the reference's name,
    ``{dir}/{model_name}_{exp}_lr{lr}_uw{uw}_lw{lw}_kl{kl}_epoch{E}_updateboth``; any other
    method or ``--refine off`` gives ``{model_name}_{exp}_{method}_lr{lr}_{hp}{value}..._epoch{E}_refine{mode}``
    with the hyper-parameters the method uses.

    A hub id keeps its slash (as the reference's path does); a local path contributes only its
    last component, so ``--model_name /data/models/neo`` does not nest the whole path.
    """
    name = cfg.model_name.rstrip("/")
    if os.path.isdir(name) or os.path.isabs(name):
        name = os.path.basename(name)
    if cfg.method == "icu" and cfg.refine == "update":
        leaf = f"{cfg.exp}_lr{cfg.lr}_uw{cfg.uw}_lw{cfg.lw}_kl{cfg.kl}_epoch{epoch}_updateboth"
    else:
        hps = "".join(f"_{k}{getattr(cfg, k)}" for k in get_method(cfg.method).uses)
        leaf = f"{cfg.exp}_{cfg.method}_lr{cfg.lr}{hps}_epoch{epoch}_refine{cfg.refine}"
    return os.path.join(cfg.dir, f"{name}_{leaf}")


_MODEL_DIR_END = re.compile(r"_epoch\d+_(updateboth|refine(" + "|".join(REFINE_MODES) + r"))$")


def is_final_model_dir(name: str) -> bool:
    """Whether a folder name is one :func:`final_model_dir` makes (for --overwrite's cleanup)."""
    return bool(_MODEL_DIR_END.search(name))
