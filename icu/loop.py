"""The iterative unlearning loop, engine- and method-agnostic (docs/method.md: #loss,
#validation, #stop-rule; the methods in docs/methods.md).

    validate (epoch 0) -> [train one epoch on the flagged pairs -> validate] ... until
        MA <= acc and some EL_n <= el, or no sample is flagged, or --max_epochs.

The loss of a step is the method's (icu/methods/); with ``--refine off`` every pair trains
every epoch and only the MA/EL rule (or --max_epochs) stops the run.

Validation is sharded over ranks: each rank evaluates validation batches rank, rank+W, ... of
the forget set (see :func:`shard_indices`), the per-sample rows are gathered, and every rank
derives the same flags and the same stop decision from the gathered table. Only the main rank writes files. After every validation the
state needed to resume (model, optimizer, flags, epoch, history, RNG states) is checkpointed
atomically to ``{dir}/checkpoint``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .checkpoint import (
    CHECKPOINT,
    check_resume_config,
    load_engine_state,
    load_state,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from .data import PairedDataset
from .engine import Engine
from .errors import disk_errors
from .loop_config import LoopConfig, final_model_dir, is_final_model_dir  # noqa: F401 (also re-exported)
from .methods import StepBatch, get_method
from .report import SCORE_COLUMNS, load_json, write_epoch_csv, write_heldout_csv, write_history_files, write_json

logger = logging.getLogger("icu")

# run.json fields of a finished attempt, kept while a resume of it runs or after it fails.
SUMMARY_KEYS = ("stop_reason", "epochs", "final", "model_dir", "seconds", "nothing_to_forget")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; the run stops and keeps its last good checkpoint."""


@dataclass
class LoopState:
    epoch: int = 0  # the last validated epoch
    flags: Optional[np.ndarray] = None
    history: list[dict] = field(default_factory=list)
    stop_reason: Optional[str] = None
    heldout_rows: dict[int, list[float]] = field(default_factory=dict)  # epoch -> per-row loss


@dataclass
class Validation:
    per_sample: pd.DataFrame
    flags: np.ndarray
    val_loss: float
    ma: float
    el: dict[str, Optional[float]]  # None: skipped (--el_when needed)
    seconds: float
    heldout: Optional[np.ndarray] = None  # (N,) per-row held-out LM loss


def shard_indices(n: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The forget-set rows ``rank`` validates: whole batches b = rank, rank+W, ... of the
    unsharded order. Each batch then holds the same rows as on a single device, so the per-batch
    val_loss summed over ranks equals the single-device sum exactly (padding and batching do not
    change), and the ranks' loads differ by at most one batch."""
    starts = range(rank * batch_size, n, world_size * batch_size)
    return [i for s in starts for i in range(s, min(s + batch_size, n))]


def stop_reason(ma: float, el: dict[str, float], n_flagged: int, acc: float, el_thr: float,
                refine: bool = True) -> Optional[str]:
    """The reference's stop rule: no sample flagged, or MA <= acc and any EL_n <= el. Without
    iterative refinement (``refine`` False) the flags do not steer training, so only MA/EL stop.

    "At most" rather than the reference's strict "<": forgotten means "no better than unseen
    text", and a calibrated EL threshold can be exactly 0 (a model that extracts nothing from
    unseen rows), which a strict comparison could never reach. With the reference's thresholds
    the two differ only on exact equality."""
    if refine and n_flagged == 0:
        return "no sample is flagged any more"
    known = [v for v in el.values() if v is not None and not np.isnan(v)]  # None: EL skipped
    if ma <= acc and any(v <= el_thr for v in known):
        return f"MA {ma:.4f} <= {acc} and EL {min(known):.4f} <= {el_thr}"
    return None


class ICULoop:
    """Runs the iterative loop with ``cfg.method``'s loss on one engine. Build it, then call
    :meth:`run`. ``reference_model`` is the frozen original model, or None when the method does
    not need it (``method.needs_reference(cfg)``)."""

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
        heldout=None,
    ):
        self.engine = engine
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.gpt2 = gpt2_tokenizer
        self.dataset = dataset
        self.reference_model = reference_model
        self.scorer = scorer
        self.run_info = run_info or {}
        self.method = get_method(cfg.method)
        self.state = LoopState()
        self.kl_cache: Optional[torch.Tensor] = None
        self.ckpt_dir = os.path.join(cfg.dir, CHECKPOINT)
        self.resume_note: dict = {}  # set by load_checkpoint: from which epoch, any --lr change
        self.started = False  # True once this attempt has written run.json
        # Injectable for tests; the default is the shared forget-set evaluation.
        self.evaluator = evaluator
        self.heldout = heldout  # EncodedSet of the --heldout rows, or None

    # ------------------------------------------------------------------ validation

    def validate(self, epoch: int) -> Validation:
        """One validation pass over the forget set, sharded across ranks and gathered; with
        ``--el_when needed`` the EL decoding runs only when this validation can end the run; with
        ``--heldout`` the held-out rows' LM loss as well."""
        t0 = time.time()
        eng, cfg = self.engine, self.cfg
        needed_only = cfg.el_when == "needed"
        model = eng.unwrapped()  # every rank calls it: under ZeRO-3 it gathers the weights
        per_sample, loss_sum, loss_batches = self.evaluate_shards(
            model, epoch, el_ns=() if needed_only else cfg.el_ns, generation=True)
        flags = per_sample["flag"].to_numpy(np.int64)
        ma = float(per_sample["ma"].mean())
        el_skipped = needed_only and not self.el_needed(epoch, ma, flags)
        if needed_only and not el_skipped:  # a second, EL-only pass (its forward is cheap)
            el_part, _, _ = self.evaluate_shards(model, epoch, el_ns=cfg.el_ns, generation=False)
            for k in cfg.el_keys:
                per_sample[k] = el_part[k].to_numpy()
        elif el_skipped:
            for k in cfg.el_keys:
                per_sample[k] = np.nan
        heldout = self.heldout_pass(model) if self.heldout is not None else None
        del model
        return Validation(
            per_sample=per_sample,
            flags=flags,
            val_loss=loss_sum / max(loss_batches, 1),
            ma=ma,
            el={k: (None if el_skipped else float(per_sample[k].mean())) for k in cfg.el_keys},
            seconds=time.time() - t0,
            heldout=heldout,
        )

    def el_needed(self, epoch: int, ma: float, flags: np.ndarray) -> bool:
        """Whether the stop rule can hold at this validation whatever EL is, or the run ends here:
        only then does ``--el_when needed`` decode EL (the stop decision is then identical)."""
        cfg = self.cfg
        no_flags = cfg.refine == "update" and int(flags.sum()) == 0
        return ma <= cfg.acc or no_flags or epoch >= cfg.max_epochs

    def evaluate_shards(self, model, epoch: int, *, el_ns, generation: bool) -> tuple[pd.DataFrame, float, int]:
        """The evaluator on this rank's share of the forget set, gathered over ranks: (the
        per-sample table in row order, with the flags; the summed batch losses; the batch count)."""
        if self.evaluator is None:
            from .forget_eval import evaluate_forget_set

            self.evaluator = evaluate_forget_set
        eng, cfg = self.engine, self.cfg
        batch_size = cfg.eval_batch_size or cfg.batch_size
        indices = shard_indices(len(self.dataset.unlearn), batch_size, eng.rank, eng.world_size)
        mine = (None, 0.0, 0)  # more ranks than validation batches: this rank only joins the gather
        if indices:
            res = self.evaluator(
                model, self.tokenizer, self.gpt2, self.dataset.unlearn,
                scorer=self.scorer, batch_size=batch_size, generation=generation,
                target_length=cfg.target_length, el_ns=tuple(el_ns), f1=cfg.f1, bleu=cfg.bleu,
                indices=indices, progress=eng.is_main, el_start=cfg.el_start,
                desc=f"validation {epoch}" if generation else f"EL {epoch}",
            )
            part = res.per_sample.copy()
            part["_row"] = indices
            part["flag"] = np.asarray(res.flags, dtype=np.int64)
            mine = (part, float(res.loss_sum), int(res.loss_batches))
        gathered = eng.all_gather_object(mine)
        parts = [g[0] for g in gathered if g[0] is not None]
        per_sample = pd.concat(parts).sort_values("_row").reset_index(drop=True).drop(columns=["_row"])
        return per_sample, sum(g[1] for g in gathered), sum(g[2] for g in gathered)

    def heldout_pass(self, model) -> np.ndarray:
        """Per-row LM loss (N,) of the held-out rows, sharded over ranks like the validation."""
        from .heldout import heldout_row_losses

        eng = self.engine
        batch_size = self.cfg.eval_batch_size or self.cfg.batch_size
        indices = shard_indices(len(self.heldout), batch_size, eng.rank, eng.world_size)
        losses = heldout_row_losses(model, self.heldout, indices, batch_size) if indices else np.zeros(0)
        out = np.zeros(len(self.heldout))
        for idx, part in eng.all_gather_object((indices, losses)):
            out[idx] = part
        return out

    def record(self, v: Validation, epoch: int, train_stats: dict) -> dict:
        """Fold a validation into the history and write the per-epoch files (main rank)."""
        cfg = self.cfg
        row: dict[str, Any] = {"epoch": epoch, "val_loss": v.val_loss, "acc": v.ma, **v.el}
        row["el_skipped"] = any(x is None for x in v.el.values())
        for col in SCORE_COLUMNS:
            row[col] = float(v.per_sample[col].mean())
        if v.heldout is not None:
            from .heldout import summarize

            h = summarize(v.heldout)
            row["heldout_loss"], row["heldout_se"] = h["loss"], h["se"]
            self.state.heldout_rows[epoch] = v.heldout.tolist()
        row["flagged"] = int(v.flags.sum())
        row["seconds_valid"] = round(v.seconds, 2)
        row.update(train_stats)
        self.state.history.append(row)
        self.state.flags = v.flags
        self.state.epoch = epoch
        if self.engine.is_main:
            write_epoch_csv(cfg.dir, epoch, v.per_sample)
            self.write_history_files()
        show = lambda x: "skipped" if x is None else f"{x:.4f}"
        logger.info(
            "epoch %d: val_loss %.4f  MA %.4f  %s  BLEU %.4f  F1 %.4f  flagged %d/%d%s  (validation %.1f s)",
            epoch, v.val_loss, v.ma, "  ".join(f"{k.upper()} {show(val)}" for k, val in v.el.items()),
            row["bleu"], row["F1"], row["flagged"], len(v.flags),
            f"  held-out loss {row['heldout_loss']:.4f} ± {row['heldout_se']:.4f}" if v.heldout is not None else "",
            v.seconds,
        )
        return row

    def write_history_files(self) -> None:
        cfg = self.cfg
        thresholds = {"acc": cfg.acc, "el": cfg.el, "bleu": cfg.bleu, "f1": cfg.f1}
        write_history_files(cfg.dir, self.state.history, cfg.el_keys, thresholds)
        if self.state.heldout_rows:
            write_heldout_csv(cfg.dir, self.state.heldout_rows)

    def stop_reason(self, ma: float, el: dict[str, float], n_flagged: int) -> Optional[str]:
        cfg = self.cfg
        return stop_reason(ma, el, n_flagged, cfg.acc, cfg.el, refine=cfg.refine == "update")

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

    def train_flags(self) -> torch.Tensor:
        """Which pairs train this epoch (N,): the last validation's flags, or all with --refine off."""
        if self.cfg.refine == "off":
            return torch.ones(len(self.dataset), dtype=torch.long)
        return torch.tensor(np.asarray(self.state.flags), dtype=torch.long)

    def step_batch(self, b: dict[str, torch.Tensor]) -> StepBatch:
        """The method's view of one step: forwards on demand, the original model if it has one."""
        module, ref = self.engine.module, self.reference_model
        forward = lambda ids, mask: module(input_ids=ids, attention_mask=mask).logits
        reference = learn_probs = None
        if ref is not None:
            reference = lambda ids, mask: ref(input_ids=ids, attention_mask=mask).logits
        if ref is not None or self.kl_cache is not None:
            learn_probs = lambda: self.reference_probs(b["index"].cpu(), b["learn_input_ids"], b["learn_attention_mask"])
        return StepBatch(b, forward, learn_allowed=self.method.needs_learn(self.cfg),
                         reference=reference, reference_learn_probs=learn_probs)

    def autocast(self):
        """bfloat16 autocast for ``--autocast bf16`` (a no-op context otherwise)."""
        return torch.autocast(self.engine.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16")

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the shuffled pairs; samples not training this epoch leave each batch."""
        eng, cfg = self.engine, self.cfg
        eng.train()
        flags = self.train_flags()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=eng.sampler(self.dataset, cfg.seed, epoch),
            num_workers=cfg.num_workers,
        )
        sums: dict[str, float] = {}
        steps = skipped = 0
        t0 = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not eng.is_main, dynamic_ncols=True)
        for batch in bar:
            plan = eng.plan_step(flags[batch["index"]] == 1)
            if plan is None:
                skipped += 1  # every sample of this batch (on every rank) is already forgotten
                continue
            b = {k: v[plan.keep].to(eng.device) for k, v in batch.items()}
            with self.autocast():  # forward passes only; the losses upcast logits to fp32
                loss, terms = self.method.loss(self.step_batch(b), cfg)
            if plan.scale != 1.0:
                loss = loss * plan.scale
            if eng.any_rank(not bool(torch.isfinite(loss).item())):
                raise NonFiniteLoss(
                    f"the loss became non-finite at epoch {epoch}, step {steps + 1} "
                    f"({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())})"
                )
            eng.backward(loss)
            eng.step()
            steps += 1
            # Weighted by the share, the sums over ranks are the step's means over all its
            # samples (share is 1 on one device, 0 for a rank's placeholder sample).
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + plan.share * v.item()
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in terms.items()})
        bar.close()
        if eng.world_size > 1:  # the same keys on every rank: the method and its weights agree
            sums = {k: eng.all_reduce_sum(sums[k]) for k in self.method.terms if k in sums}
        stats = {f"loss_{k}": (sums[k] / steps if steps and k in sums else float("nan")) for k in self.method.terms}
        stats.update({"steps": steps, "skipped_batches": skipped, "seconds_train": round(time.time() - t0, 2)})
        return stats

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Checkpoint the state needed to resume (icu/checkpoint.py writes it atomically)."""
        state = {
            "epoch": self.state.epoch,
            "flags": self.state.flags,
            "history": self.state.history,
            "heldout_rows": self.state.heldout_rows,
            "rng": rng_states(),
            "config": self.cfg.__dict__,
        }
        save_checkpoint(self.engine, self.ckpt_dir, self.tokenizer, state)

    def load_checkpoint(self) -> None:
        """Restore the loop's state and the optimizer (the model weights were loaded by the
        script from ``checkpoint/model`` before the engine was built). Settings that change the
        results must equal the checkpoint's; a new --lr goes into the restored optimizer."""
        state = load_state(self.ckpt_dir)
        saved_cfg = state.get("config") or {}
        check_resume_config(saved_cfg, self.cfg.__dict__)
        self.state = LoopState(epoch=state["epoch"], flags=state["flags"], history=state["history"],
                               heldout_rows=state.get("heldout_rows") or {})
        load_engine_state(self.engine, self.ckpt_dir)
        self.engine.set_lr(self.cfg.lr)  # the optimizer state restored the checkpoint's lr
        old_lr = saved_cfg.get("lr", self.cfg.lr)
        self.resume_note = {"resumed_from_epoch": self.state.epoch, "lr_changed": None}
        if old_lr != self.cfg.lr:
            self.resume_note["lr_changed"] = {"from": old_lr, "to": self.cfg.lr, "at_epoch": self.state.epoch}
            logger.warning("--lr changed on resume: %g -> %g from epoch %d on", old_lr, self.cfg.lr, self.state.epoch + 1)
        restore_rng_states(state["rng"])
        logger.info(
            "resumed from %s: epoch %d validated, %d samples flagged",
            self.ckpt_dir, self.state.epoch, int(self.state.flags.sum()),
        )

    def write_run_json(self, status: str, **fields) -> None:
        """run.json on the main rank. On a resume the last finished attempt's summary fields stay
        until this attempt finishes, so a failed resume never loses them."""
        if not self.engine.is_main:
            return
        path = os.path.join(self.cfg.dir, "run.json")
        previous = {}
        if self.resume_note and os.path.isfile(path):
            try:
                previous = {k: v for k, v in load_json(path).items() if k in SUMMARY_KEYS}
            except ValueError:
                pass  # an unreadable old run.json: nothing to keep
        write_json(path, {**previous, **self.run_info, **self.resume_note, "status": status, **fields})
        self.started = True

    # ------------------------------------------------------------------ the run

    def run(self, resume: bool = False) -> dict:
        """Validate, train, repeat until the stop rule; save the final model. Returns a summary."""
        cfg = self.cfg
        t0 = time.time()
        if resume:  # first: a refused or damaged checkpoint fails before any long work
            self.load_checkpoint()
        if cfg.kl_mode == "cached" and "kl" in self.method.uses and cfg.kl != 0:
            self.build_kl_cache()
        self.write_run_json("running", **({} if resume else {"stop_reason": None}))
        if resume:
            last = self.state.history[-1]
            reason = self.stop_reason(last["acc"], {k: last[k] for k in cfg.el_keys}, last["flagged"])
        else:
            v = self.validate(0)
            last = self.record(v, 0, {})
            reason = self.stop_reason(v.ma, v.el, int(v.flags.sum()))
            self.save_checkpoint()
        # The stop rule already holds on the untouched model: there is nothing to unlearn.
        nothing_to_forget = reason is not None and self.state.epoch == 0
        while reason is None:
            if self.state.epoch >= cfg.max_epochs:
                reason = f"reached --max_epochs {cfg.max_epochs} before the stop rule held"
                if self.engine.is_main:
                    logger.warning("stopping: %s", reason)
                break
            epoch = self.state.epoch + 1
            stats = self.train_epoch(epoch)
            losses = " ".join(f"{k[5:]} {v:.4f}" for k, v in stats.items() if k.startswith("loss_"))
            logger.info(
                "epoch %d trained: %d steps (%d batches skipped), losses %s, %.1f s",
                epoch, stats["steps"], stats["skipped_batches"], losses, stats["seconds_train"],
            )
            v = self.validate(epoch)
            last = self.record(v, epoch, stats)
            reason = self.stop_reason(v.ma, v.el, int(v.flags.sum()))
            self.save_checkpoint()
        self.state.stop_reason = reason
        logger.info("stopped after epoch %d: %s", self.state.epoch, reason)
        model_dir = None
        if nothing_to_forget:
            logger.warning(
                "nothing to forget: the model met the stop rule before any training (%s at epoch 0, "
                "thresholds --acc %s, --el %s). It is left unchanged and no unlearned copy is saved. "
                "If it should know these targets, check --tokenizer_name and --gpt2_name",
                reason, cfg.acc, cfg.el,
            )
        elif cfg.save_model:
            model_dir = final_model_dir(cfg, self.state.epoch)
            with disk_errors(f"the unlearned model {model_dir}"):
                self.engine.save_model(model_dir, self.tokenizer)
            logger.info("saved the unlearned model to %s", model_dir)
        summary = {
            "stop_reason": reason,
            "epochs": self.state.epoch,
            "final": last,
            "model_dir": model_dir,
            "nothing_to_forget": nothing_to_forget,
            "seconds": round(time.time() - t0, 1),
        }
        if self.engine.is_main:
            self.write_history_files()
        self.write_run_json("finished", **summary)
        return summary
