"""The iterative ICU loop, engine-agnostic (ICU_SPEC.md, "Loss", "Validation", stop rule).

    validate (epoch 0) -> [train one epoch on the flagged pairs -> validate] ... until
        MA <= acc and some EL_n <= el, or no sample is flagged, or --max_epochs.

Validation is sharded over ranks: each rank evaluates validation batches rank, rank+W, ... of
the forget set (see :func:`shard_indices`), the per-sample rows are gathered, and every rank
derives the same flags and the same stop decision from the gathered table. Only the main rank writes files. After every validation the
state needed to resume (model, optimizer, flags, epoch, history, RNG states) is checkpointed
atomically to ``{dir}/checkpoint``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import EncodedSet, PairedDataset
from .engine import Engine, load_pickle, save_pickle
from .losses import icu_loss, kl_term, lm_loss
from .metrics import EL_START, el_column
from .report import SCORE_COLUMNS, plot_history, write_csv, write_json

logger = logging.getLogger("icu")

EPOCH_CSV_COLUMNS = ("id", "diff", "entropy", "bleu", "P", "R", "F1", "candidate", "reference")
CHECKPOINT = "checkpoint"


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; the run stops and keeps its last good checkpoint."""


@dataclass
class LoopConfig:
    exp: str
    model_name: str
    dir: str
    lr: float = 5e-6
    uw: float = 1.0
    lw: float = 0.5
    kl: float = 1.0
    f1: float = 0.3
    bleu: float = 0.01
    acc: float = 0.5994
    el: float = 0.0499
    el_ns: tuple[int, ...] = (10,)
    el_start: int = EL_START  # first EL prefix: 150 = ICU, 1 = Knowledge Unlearning
    target_length: int = 200
    batch_size: int = 8
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    max_epochs: int = 50
    seed: int = 42
    kl_mode: str = "frozen"  # "frozen": p0 from a frozen copy on the fly; "cached": N x L x V cache
    save_model: bool = True

    @property
    def el_keys(self) -> list[str]:
        # el_10 for ICU's definition, el_10_from1 for KU's: the name says which one it is
        return [el_column(n, self.el_start) for n in self.el_ns]


@dataclass
class LoopState:
    epoch: int = 0  # the last validated epoch
    flags: Optional[np.ndarray] = None
    history: list[dict] = field(default_factory=list)
    stop_reason: Optional[str] = None


@dataclass
class Validation:
    per_sample: pd.DataFrame
    flags: np.ndarray
    val_loss: float
    ma: float
    el: dict[str, float]
    seconds: float


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def shard_indices(n: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The forget-set rows ``rank`` validates: whole batches b = rank, rank+W, ... of the
    unsharded order. Each batch then holds the same rows as on a single device, so the per-batch
    val_loss summed over ranks equals the single-device sum exactly (padding and batching do not
    change), and the ranks' loads differ by at most one batch."""
    starts = range(rank * batch_size, n, world_size * batch_size)
    return [i for s in starts for i in range(s, min(s + batch_size, n))]


def stop_reason(ma: float, el: dict[str, float], n_flagged: int, acc: float, el_thr: float) -> Optional[str]:
    """The reference's stop rule: no sample flagged, or MA <= acc and any EL_n <= el.

    "At most" rather than the reference's strict "<": forgotten means "no better than unseen
    text", and a calibrated EL threshold can be exactly 0 (a model that extracts nothing from
    unseen rows), which a strict comparison could never reach. With the reference's thresholds
    the two differ only on exact equality."""
    if n_flagged == 0:
        return "no sample is flagged any more"
    if ma <= acc and any(v <= el_thr for v in el.values()):
        return f"MA {ma:.4f} <= {acc} and EL {min(el.values()):.4f} <= {el_thr}"
    return None


def final_model_dir(cfg: LoopConfig, epoch: int) -> str:
    """``{dir}/{model_name}_{exp}_lr{lr}_uw{uw}_lw{lw}_kl{kl}_epoch{E}_updateboth``.

    A hub id keeps its slash (as the reference's path does); a local path contributes only its
    last component, so ``--model_name /data/models/neo`` does not nest the whole path.
    """
    name = cfg.model_name.rstrip("/")
    if os.path.isdir(name) or os.path.isabs(name):
        name = os.path.basename(name)
    return os.path.join(
        cfg.dir,
        f"{name}_{cfg.exp}_lr{cfg.lr}_uw{cfg.uw}_lw{cfg.lw}_kl{cfg.kl}_epoch{epoch}_updateboth",
    )


class ICULoop:
    """Runs ICU on one engine. Build it, then call :meth:`run`."""

    def __init__(
        self,
        engine: Engine,
        cfg: LoopConfig,
        *,
        tokenizer,
        gpt2_tokenizer,
        dataset: PairedDataset,
        reference_model: Optional[torch.nn.Module],
        scorer,
        run_info: Optional[dict] = None,
        evaluator=None,
    ):
        self.engine = engine
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.gpt2 = gpt2_tokenizer
        self.dataset = dataset
        self.reference_model = reference_model
        self.scorer = scorer
        self.run_info = run_info or {}
        self.state = LoopState()
        self.kl_cache: Optional[torch.Tensor] = None
        self.ckpt_dir = os.path.join(cfg.dir, CHECKPOINT)
        # Injectable for tests; the default is the shared forget-set evaluation.
        self.evaluator = evaluator

    # ------------------------------------------------------------------ validation

    def validate(self, epoch: int) -> Validation:
        """One validation pass over the forget set, sharded across ranks and gathered."""
        if self.evaluator is None:
            from .forget_eval import evaluate_forget_set

            self.evaluator = evaluate_forget_set
        t0 = time.time()
        eng, cfg = self.engine, self.cfg
        n = len(self.dataset.unlearn)
        batch_size = cfg.eval_batch_size or cfg.batch_size
        indices = shard_indices(n, batch_size, eng.rank, eng.world_size)
        model = eng.unwrapped()  # every rank calls it: under ZeRO-3 it gathers the weights
        if indices:
            res = self.evaluator(
                model, self.tokenizer, self.gpt2, self.dataset.unlearn,
                scorer=self.scorer, batch_size=batch_size,
                target_length=cfg.target_length, el_ns=cfg.el_ns, f1=cfg.f1, bleu=cfg.bleu,
                indices=indices, progress=eng.is_main, desc=f"validation {epoch}", el_start=cfg.el_start,
            )
            part = res.per_sample.rename(columns=dict(zip([f"el_{n}" for n in cfg.el_ns], cfg.el_keys)))
            part["_row"] = indices
            part["flag"] = np.asarray(res.flags, dtype=np.int64)
            mine = (part, float(res.loss_sum), int(res.loss_batches))
        else:  # more ranks than validation batches: this rank only joins the gather
            mine = (None, 0.0, 0)
        del model
        gathered = eng.all_gather_object(mine)
        parts = [g[0] for g in gathered if g[0] is not None]
        per_sample = pd.concat(parts).sort_values("_row").reset_index(drop=True)
        loss_sum = sum(g[1] for g in gathered)
        loss_batches = sum(g[2] for g in gathered)
        flags = per_sample["flag"].to_numpy(np.int64)
        return Validation(
            per_sample=per_sample.drop(columns=["_row"]),
            flags=flags,
            val_loss=loss_sum / max(loss_batches, 1),
            ma=float(per_sample["ma"].mean()),
            el={k: float(per_sample[k].mean()) for k in cfg.el_keys},
            seconds=time.time() - t0,
        )

    def record(self, v: Validation, epoch: int, train_stats: dict) -> dict:
        """Fold a validation into the history and write the per-epoch files (main rank)."""
        cfg = self.cfg
        row: dict[str, Any] = {"epoch": epoch, "val_loss": v.val_loss, "acc": v.ma, **v.el}
        for col in SCORE_COLUMNS:
            row[col] = float(v.per_sample[col].mean())
        row["flagged"] = int(v.flags.sum())
        row["seconds_valid"] = round(v.seconds, 2)
        row.update(train_stats)
        self.state.history.append(row)
        self.state.flags = v.flags
        self.state.epoch = epoch
        if self.engine.is_main:
            extra = [c for c in v.per_sample.columns if c not in EPOCH_CSV_COLUMNS]
            write_csv(os.path.join(cfg.dir, f"epoch{epoch}.csv"), v.per_sample[list(EPOCH_CSV_COLUMNS) + extra])
            self.write_history_files()
        logger.info(
            "epoch %d: val_loss %.4f  MA %.4f  %s  BLEU %.4f  F1 %.4f  flagged %d/%d  (validation %.1f s)",
            epoch, v.val_loss, v.ma, "  ".join(f"{k.upper()} {val:.4f}" for k, val in v.el.items()),
            row["bleu"], row["F1"], row["flagged"], len(v.flags), v.seconds,
        )
        return row

    def write_history_files(self) -> None:
        cfg, hist = self.cfg, self.state.history
        df = pd.DataFrame(hist)
        write_csv(os.path.join(cfg.dir, "valid.csv"), df[["epoch", "val_loss", "acc", *cfg.el_keys]])
        write_csv(os.path.join(cfg.dir, "score.csv"), df[["epoch", *SCORE_COLUMNS]])
        write_csv(os.path.join(cfg.dir, "history.csv"), df)
        plot_history(
            hist,
            {"acc": cfg.acc, "el": cfg.el, "bleu": cfg.bleu, "f1": cfg.f1},
            os.path.join(cfg.dir, "metrics.png"),
            el_key=cfg.el_keys[0],
        )

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def build_kl_cache(self) -> None:
        """The reference's mode: p0 of every learn sample, computed once (N x L x V floats)."""
        model = self.reference_model
        learn = self.dataset.learn
        chunks = []
        for start in tqdm(range(0, len(learn), self.cfg.batch_size), desc="KL cache", disable=not self.engine.is_main):
            ids = learn.input_ids[start : start + self.cfg.batch_size].to(self.engine.device)
            mask = learn.attention_mask[start : start + self.cfg.batch_size].to(self.engine.device)
            chunks.append(torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1).cpu())
        self.kl_cache = torch.cat(chunks)

    def reference_probs(self, index: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kl_cache is not None:
            return self.kl_cache[index].to(self.engine.device)
        with torch.no_grad():
            return torch.softmax(self.reference_model(input_ids=ids, attention_mask=mask).logits.float(), -1)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the shuffled pairs; unflagged samples are dropped from each batch."""
        eng, cfg = self.engine, self.cfg
        eng.train()
        flags = torch.tensor(np.asarray(self.state.flags), dtype=torch.long)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=eng.sampler(self.dataset, cfg.seed, epoch),
            num_workers=cfg.num_workers,
        )
        sums = {"unlearn": 0.0, "learn": 0.0, "kl": 0.0}
        steps = skipped = 0
        t0 = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not eng.is_main, dynamic_ncols=True)
        for batch in bar:
            keep = flags[batch["index"]] == 1
            n_local = int(keep.sum())
            local_work = n_local > 0
            # The flagged samples of this step on all ranks together (one all-reduce).
            n_global = int(round(eng.all_reduce_sum(n_local)))
            if n_global == 0:
                skipped += 1  # every sample of this batch (on every rank) is already forgotten
                continue
            # This rank's share of the step. DeepSpeed averages gradients over ranks, so
            # scaling each rank's mean loss by W * share makes the update the gradient of the
            # mean over all flagged samples of the step, as one device with batch W x B would
            # take, also when flags leave the ranks with different numbers of samples.
            share = n_local / n_global
            if not local_work:
                # Another rank has work: join its gradient all-reduce with a zero-weight loss on
                # one sample, so the collectives stay matched.
                keep = torch.zeros_like(keep)
                keep[0] = True
            b = {k: v[keep].to(eng.device) for k, v in batch.items()}
            u_logits = eng.module(input_ids=b["unlearn_input_ids"], attention_mask=b["unlearn_attention_mask"]).logits
            l_logits = eng.module(input_ids=b["learn_input_ids"], attention_mask=b["learn_attention_mask"]).logits
            l_unlearn = lm_loss(u_logits, b["unlearn_labels"])
            l_learn = lm_loss(l_logits, b["learn_labels"])
            if cfg.kl != 0:
                p0 = self.reference_probs(b["index"].cpu(), b["learn_input_ids"], b["learn_attention_mask"])
                l_kl = kl_term(l_logits, p0)
            else:
                l_kl = torch.zeros((), device=l_logits.device)
            loss = icu_loss(l_unlearn, l_learn, l_kl, cfg.uw, cfg.lw, cfg.kl)
            if not local_work:
                loss = loss * 0.0
            elif eng.world_size > 1:
                loss = loss * (share * eng.world_size)
            if eng.any_rank(not bool(torch.isfinite(loss).item())):
                raise NonFiniteLoss(
                    f"the loss became non-finite at epoch {epoch}, step {steps + 1} "
                    f"(unlearn {l_unlearn.item():.4g}, learn {l_learn.item():.4g}, kl {l_kl.item():.4g})"
                )
            eng.backward(loss)
            eng.step()
            steps += 1
            # Weighted by the share, the sums over ranks are the step's means over all its
            # flagged samples (share is 1 on one device, 0 for a rank's placeholder sample).
            sums["unlearn"] += share * l_unlearn.item()
            sums["learn"] += share * l_learn.item()
            sums["kl"] += share * l_kl.item()
            bar.set_postfix(unlearn=f"{l_unlearn.item():.3f}", learn=f"{l_learn.item():.3f}", kl=f"{l_kl.item():.3f}")
        bar.close()
        if eng.world_size > 1:
            sums = {k: eng.all_reduce_sum(v) for k, v in sums.items()}
        stats = {f"loss_{k}": (v / steps if steps else float("nan")) for k, v in sums.items()}
        stats.update({"steps": steps, "skipped_batches": skipped, "seconds_train": round(time.time() - t0, 2)})
        return stats

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.tmp`` on every rank, then swap it in on the main rank."""
        eng = self.engine
        tmp = self.ckpt_dir + ".tmp"
        if eng.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        eng.barrier()
        eng.save_model(os.path.join(tmp, "model"), self.tokenizer)
        eng.save_state(tmp)
        state = {
            "epoch": self.state.epoch,
            "flags": self.state.flags,
            "history": self.state.history,
            "rng": rng_states(),
            "config": self.cfg.__dict__,
        }
        if eng.is_main:
            save_pickle(os.path.join(tmp, "state.pkl"), state)
            old = self.ckpt_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.isdir(self.ckpt_dir):
                os.replace(self.ckpt_dir, old)
            os.replace(tmp, self.ckpt_dir)
            shutil.rmtree(old, ignore_errors=True)
        eng.barrier()

    def load_checkpoint(self) -> None:
        """Restore the loop's state and the optimizer (the model weights were loaded by the
        script from ``checkpoint/model`` before the engine was built)."""
        state = load_pickle(os.path.join(self.ckpt_dir, "state.pkl"))
        self.state = LoopState(epoch=state["epoch"], flags=state["flags"], history=state["history"])
        self.engine.load_state(self.ckpt_dir)
        restore_rng_states(state["rng"])
        logger.info(
            "resumed from %s: epoch %d validated, %d samples flagged",
            self.ckpt_dir, self.state.epoch, int(self.state.flags.sum()),
        )

    # ------------------------------------------------------------------ the run

    def run(self, resume: bool = False) -> dict:
        """Validate, train, repeat until the stop rule; save the final model. Returns a summary."""
        cfg = self.cfg
        t0 = time.time()
        if cfg.kl_mode == "cached" and cfg.kl != 0:
            self.build_kl_cache()
        if resume:
            self.load_checkpoint()
            last = self.state.history[-1]
            reason = stop_reason(last["acc"], {k: last[k] for k in cfg.el_keys}, last["flagged"], cfg.acc, cfg.el)
        else:
            v = self.validate(0)
            last = self.record(v, 0, {})
            reason = stop_reason(v.ma, v.el, int(v.flags.sum()), cfg.acc, cfg.el)
            self.save_checkpoint()
        while reason is None:
            if self.state.epoch >= cfg.max_epochs:
                reason = f"reached --max_epochs {cfg.max_epochs} before the stop rule held"
                if self.engine.is_main:
                    logger.warning("stopping: %s", reason)
                break
            epoch = self.state.epoch + 1
            stats = self.train_epoch(epoch)
            logger.info(
                "epoch %d trained: %d steps (%d batches skipped), losses unlearn %.4f learn %.4f kl %.4f, %.1f s",
                epoch, stats["steps"], stats["skipped_batches"], stats["loss_unlearn"],
                stats["loss_learn"], stats["loss_kl"], stats["seconds_train"],
            )
            v = self.validate(epoch)
            last = self.record(v, epoch, stats)
            reason = stop_reason(v.ma, v.el, int(v.flags.sum()), cfg.acc, cfg.el)
            self.save_checkpoint()
        self.state.stop_reason = reason
        logger.info("stopped after epoch %d: %s", self.state.epoch, reason)
        model_dir = None
        if cfg.save_model:
            model_dir = final_model_dir(cfg, self.state.epoch)
            self.engine.save_model(model_dir, self.tokenizer)
            logger.info("saved the unlearned model to %s", model_dir)
        summary = {
            "stop_reason": reason,
            "epochs": self.state.epoch,
            "final": last,
            "model_dir": model_dir,
            "seconds": round(time.time() - t0, 1),
        }
        if self.engine.is_main:
            self.write_history_files()
            write_json(os.path.join(cfg.dir, "run.json"), {**self.run_info, "status": "finished", **summary})
        return summary
