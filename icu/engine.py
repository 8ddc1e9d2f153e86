"""Engines: how a model is wrapped, how backward/step run, how ranks talk, how state is saved.

The ICU loop (icu/loop.py) only talks to this interface, so the single-device trainer and the
DeepSpeed trainer share every other line. ``TorchEngine`` is one process on one device;
``DeepSpeedEngine`` wraps ``deepspeed.initialize`` (ZeRO-2/3, any number of ranks).
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Iterable, Optional

import torch

ADAM_BETAS = (0.9, 0.98)


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

    # -- data
    def sampler(self, dataset, seed: int, epoch: int):
        """A sampler giving this rank its shuffled share of ``dataset`` for ``epoch``."""
        raise NotImplementedError

    # -- collectives (identity on one process)
    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def any_rank(self, value: bool) -> bool:
        return bool(value)

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
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        return torch.utils.data.RandomSampler(dataset, generator=gen)

    def save_model(self, path: str, tokenizer=None) -> None:
        self.module.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def save_state(self, directory: str) -> None:
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))

    def load_state(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state)


class DeepSpeedEngine(Engine):
    """deepspeed.initialize around the model; the optimizer is DeepSpeed's Adam built from the
    JSON config, whose lr/betas the trainer has already made consistent with the flags."""

    def __init__(self, model: torch.nn.Module, ds_config: dict):
        import deepspeed
        import torch.distributed as dist

        self._dist = dist
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_config
        )
        self.module = self.engine
        self.device = self.engine.device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def unwrapped(self) -> torch.nn.Module:
        return self.engine.module

    def sampler(self, dataset, seed: int, epoch: int):
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        return sampler

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def any_rank(self, value: bool) -> bool:
        flag = torch.tensor([1 if value else 0], dtype=torch.int64, device=self._collective_device())
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX)
        return bool(flag.item())

    def _collective_device(self) -> torch.device:
        # gloo reduces CPU tensors; nccl needs them on the GPU.
        return torch.device("cpu") if self._dist.get_backend() == "gloo" else self.device

    def barrier(self) -> None:
        self._dist.barrier()

    def save_model(self, path: str, tokenizer=None) -> None:
        model = self.engine.module
        if self.zero_stage == 3:
            # Weights are partitioned across ranks: gather a full state dict (all ranks call).
            state = self.engine._zero3_consolidated_16bit_state_dict()
            if self.is_main:
                model.save_pretrained(path, state_dict=state)
        elif self.is_main:
            model.save_pretrained(path)
        if self.is_main and tokenizer is not None:
            tokenizer.save_pretrained(path)
        self.barrier()

    def save_state(self, directory: str) -> None:
        # Every rank writes its optimizer shard; tag "icu" keeps one fixed sub-folder name.
        self.engine.save_checkpoint(directory, tag="icu", save_latest=False)

    def load_state(self, directory: str) -> None:
        self.engine.load_checkpoint(
            directory, tag="icu", load_optimizer_states=True, load_lr_scheduler_states=False
        )


def save_pickle(path: str, obj: Any) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def load_pickle(path: str) -> Any:
    with open(path, "rb") as fh:
        return pickle.load(fh)
