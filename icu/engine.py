"""Engines: how a model is wrapped, how backward/step run, how ranks talk, how state is saved.

The ICU loop (icu/loop.py) only talks to this interface, so the single-device trainer and the
DeepSpeed trainer share every other line. ``TorchEngine`` is one process on one device;
``DeepSpeedEngine`` wraps ``deepspeed.initialize`` (ZeRO-2/3, any number of ranks).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

ADAM_BETAS = (0.9, 0.98)
DS_TAG = "icu"  # the DeepSpeed checkpoint's sub-folder inside the loop's checkpoint folder
DS_INFO = "deepspeed.json"  # world size and ZeRO stage the checkpoint was written with


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s sample order (the same for every engine)."""
    return seed * 100003 + epoch


@dataclass
class StepShare:
    """This rank's part of one training step (see :meth:`Engine.plan_step`)."""

    keep: torch.Tensor  # (B,) bool: the batch rows this rank computes its loss on
    share: float  # this rank's fraction of the step's samples over all ranks (0: placeholder)
    scale: float  # factor on this rank's mean loss (1 on one device, 0 for a placeholder)


class Engine:
    """The interface the loop uses. Subclasses fill in the distributed parts."""

    rank: int = 0
    world_size: int = 1
    device: torch.device
    module: torch.nn.Module  # the object to call forward on

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- training
    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def unwrapped(self) -> torch.nn.Module:
        """The plain HF model (for evaluation, generation and save_pretrained)."""
        raise NotImplementedError

    def plan_step(self, keep: torch.Tensor) -> Optional[StepShare]:
        """Agree with the other ranks on one step over the batch rows ``keep`` marks (B,) bool.

        None when no rank has a row to train on (the step is skipped everywhere). DeepSpeed
        averages gradients over ranks, so scaling each rank's mean loss by W * share makes the
        update the gradient of the mean over all the step's rows, as one device with batch
        W x B would take, also when ranks hold different numbers of rows. A rank without rows
        joins the gradient all-reduce with a zero-weight loss on one row, so the collectives
        stay matched.
        """
        n_local = int(keep.sum())
        n_global = int(round(self.all_reduce_sum(n_local)))  # one all-reduce
        if n_global == 0:
            return None
        if n_local == 0:
            placeholder = torch.zeros_like(keep)
            placeholder[0] = True
            return StepShare(placeholder, 0.0, 0.0)
        share = n_local / n_global
        return StepShare(keep, share, share * self.world_size if self.world_size > 1 else 1.0)

    # -- data
    def sampler(self, dataset, seed: int, epoch: int):
        """A sampler giving this rank its shuffled share of ``dataset`` for ``epoch``."""
        raise NotImplementedError

    # -- collectives (identity on one process)
    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def any_rank(self, value: bool) -> bool:
        return bool(value)

    def all_reduce_sum(self, value: float) -> float:
        """The sum of ``value`` over all ranks."""
        return value

    def barrier(self) -> None:
        pass

    # -- state
    def save_model(self, path: str, tokenizer=None) -> None:
        """HF save_pretrained on the main rank (every rank must call it: ZeRO-3 gathers)."""
        raise NotImplementedError

    def save_state(self, directory: str) -> None:
        """Optimizer (and engine) state needed to resume, into ``directory``."""
        raise NotImplementedError

    def load_state(self, directory: str) -> None:
        raise NotImplementedError


class TorchEngine(Engine):
    """One process, one device, torch.optim.Adam with the reference's betas."""

    def __init__(self, model: torch.nn.Module, lr: float, device: torch.device):
        self.device = device
        self.module = model.to(device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def unwrapped(self) -> torch.nn.Module:
        return self.module

    def sampler(self, dataset, seed: int, epoch: int):
        # A generator seeded by (seed, epoch) makes each epoch's order independent of any RNG
        # state carried across epochs, so a resumed run sees the same order.
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        return torch.utils.data.RandomSampler(dataset, generator=gen)

    def save_model(self, path: str, tokenizer=None) -> None:
        self.module.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def save_state(self, directory: str) -> None:
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))

    def load_state(self, directory: str) -> None:
        path = os.path.join(directory, "optimizer.pt")
        if not os.path.isfile(path):
            from .errors import IcuError

            raise IcuError(
                f"{path} not found: this checkpoint was not written by the single-device trainer "
                "(a DeepSpeed run resumes with train_neo_meanwhile_update_deepspeed.py)"
            )
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state)


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` around the model: data parallel over all ranks, ZeRO 0-3.

    ``ds_config`` is the dict :func:`icu.ds_config.reconcile_ds_config` produced, so its
    optimizer lr is ``--lr``, its betas the reference's and its batch keys agree with
    ``--batch_size`` and the world size. The process group must already be initialized (the
    trainer script does it so that it can check the config before anything else).
    """

    def __init__(self, model: torch.nn.Module, ds_config: dict):
        import deepspeed
        import torch.distributed as dist

        self._dist = dist
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_config
        )
        self.module = self.engine
        self.device = torch.device(self.engine.device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.zero_stage = int(self.engine.zero_optimization_stage())

    # -- training
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def unwrapped(self) -> torch.nn.Module:
        if self.zero_stage == 3:
            # ZeRO-3 partitions every weight and gathers it inside each forward, a collective.
            # Sharded validation runs a different number of forwards on each rank, so it gets a
            # plain full copy instead (freed when the caller drops it).
            return self._full_copy(keep=True)
        return self.engine.module

    def _full_copy(self, keep: bool) -> Optional[torch.nn.Module]:
        """A plain (hook-free) copy of the ZeRO-3 model. Every rank must call this, in step:
        each weight is all-gathered in turn; only ranks with ``keep`` build the copy."""
        import deepspeed

        src = self.engine.module
        dst = None
        if keep:
            dtype = next(src.parameters()).dtype
            with torch.device("meta"):  # no memory, no random init
                dst = type(src)(src.config)
            dst.to_empty(device=self.device)
            if hasattr(dst, "tie_weights"):
                dst.tie_weights()  # to_empty gives tied weights (lm_head = wte) separate storage
            dst.to(dtype)
            if getattr(src, "generation_config", None) is not None:
                dst.generation_config = copy.deepcopy(src.generation_config)
            dst_params = dict(dst.named_parameters())
            dst_buffers = dict(dst.named_buffers())
            missing = set(dst_params) - {name for name, _ in src.named_parameters()}
            if missing:  # a weight the copy would leave uninitialized
                raise RuntimeError(f"ZeRO-3 evaluation copy: no source for {sorted(missing)[:3]}")
            with torch.no_grad():
                # Buffers are never partitioned; they also replace to_empty's garbage in
                # non-persistent buffers such as attention masks.
                for name, buf in src.named_buffers():
                    dst_buffers[name].copy_(buf)
        for name, param in src.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if dst is not None:
                    with torch.no_grad():
                        dst_params[name].copy_(param.data)
        if dst is not None:
            dst.eval().requires_grad_(False)
        return dst

    # -- data
    def sampler(self, dataset, seed: int, epoch: int):
        # Seeded like TorchEngine's permutation: rank r takes positions r, r+W, ... of it, so
        # step k's micro batches together are exactly the single-device batch k of size
        # batch_size x W. (When W does not divide the dataset, DistributedSampler repeats the
        # first few samples so every rank has the same number of batches.)
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=epoch_seed(seed, 0)
        )
        sampler.set_epoch(epoch)
        return sampler

    # -- collectives
    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def any_rank(self, value: bool) -> bool:
        flag = torch.tensor([1 if value else 0], dtype=torch.int64, device=self._collective_device())
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX)
        return bool(flag.item())

    def all_reduce_sum(self, value: float) -> float:
        total = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        self._dist.all_reduce(total, op=self._dist.ReduceOp.SUM)
        return float(total.item())

    def _collective_device(self) -> torch.device:
        # gloo reduces CPU tensors; nccl needs them on this rank's GPU.
        return torch.device("cpu") if self._dist.get_backend() == "gloo" else self.device

    def barrier(self) -> None:
        self._dist.barrier()

    # -- state
    def save_model(self, path: str, tokenizer=None) -> None:
        if self.zero_stage == 3:
            model = self._full_copy(keep=self.is_main)
        else:
            model = self.engine.module
        if self.is_main:
            model.save_pretrained(path)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)
        del model
        self.barrier()

    def save_state(self, directory: str) -> None:
        # Every rank writes its optimizer partition under the fixed tag "icu", so the loop's
        # checkpoint.tmp -> checkpoint swap moves one complete DeepSpeed checkpoint.
        self.engine.save_checkpoint(directory, tag=DS_TAG, save_latest=False)
        if self.is_main:
            info = {"world_size": self.world_size, "zero_stage": self.zero_stage}
            with open(os.path.join(directory, DS_INFO), "w", encoding="utf-8") as fh:
                json.dump(info, fh)

    def load_state(self, directory: str) -> None:
        from .errors import IcuError

        check_deepspeed_checkpoint(directory, self.world_size)
        load_path, _ = self.engine.load_checkpoint(
            directory, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise IcuError(f"--resume: DeepSpeed could not load the checkpoint in {os.path.join(directory, DS_TAG)}")


def check_deepspeed_checkpoint(directory: str, world_size: int) -> None:
    """Raise IcuError unless ``directory`` holds a DeepSpeed checkpoint this world can load.

    The trainer calls it before writing anything; DeepSpeedEngine.load_state again."""
    from .errors import IcuError

    tag_dir = os.path.join(directory, DS_TAG)
    if not os.path.isdir(tag_dir):
        hint = (
            " it was written by the single-device trainer; resume it with train_neo_meanwhile_update.py"
            if os.path.isfile(os.path.join(directory, "optimizer.pt")) else ""
        )
        raise IcuError(f"--resume: {directory} holds no DeepSpeed checkpoint ({tag_dir} is missing);{hint}")
    info_path = os.path.join(directory, DS_INFO)
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
        # ZeRO partitions the optimizer state by rank; another world size cannot load it.
        if info.get("zero_stage", 0) > 0 and info.get("world_size") != world_size:
            raise IcuError(
                f"--resume: the checkpoint in {directory} was written by {info.get('world_size')} ranks "
                f"with ZeRO stage {info.get('zero_stage')}, this run has {world_size}; resume with "
                f"{info.get('world_size')} ranks"
            )


def init_deepspeed_distributed(local_rank: Optional[int] = None) -> tuple[int, int, int, torch.device]:
    """Join the launcher's process group (deepspeed, torchrun; or create a one-process group
    for a plain ``python`` run). Returns (rank, local rank, world size, this rank's device):
    cuda:LOCAL_RANK with nccl on GPUs, the CPU with gloo when DS_ACCELERATOR=cpu."""
    import socket

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK=str(local_rank or 0), WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)  # before the first collective, so nccl uses this rank's GPU
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    return dist.get_rank(), local_rank, dist.get_world_size(), torch.device(acc.device_name(local_rank))


def agree_on_error(error: Optional[str], world_size: int) -> Optional[str]:
    """Every rank passes its own error (or None) and gets the first one any rank had, so a check
    that fails anywhere stops all ranks at the same point."""
    import torch.distributed as dist

    errors: list[Optional[str]] = [None] * world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def shutdown_distributed(barrier: bool) -> None:
    """Leave the process group before the interpreter exits. With ``barrier`` (only where every
    rank is known to arrive) no rank tears down its connections while a peer still uses them,
    which gloo answers with SIGABRT instead of the exit code the user should see."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def save_pickle(path: str, obj: Any) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def load_pickle(path: str) -> Any:
    with open(path, "rb") as fh:
        return pickle.load(fh)
