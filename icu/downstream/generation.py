"""Greedy generation for the downstream suite (dialog replies), as mixins of the scorers.

:class:`GreedyGeneration` is the fast path: prompts sorted by length, left-padded in batches
with attention masks, Hugging Face ``generate`` (or a plain greedy loop for a bare module), and a
batch stops as soon as every row has passed the stop string. :class:`SequentialGeneration` is the
reference's way: one prompt at a time, padded to a fixed length, all ``max_new_tokens`` tokens
generated and then cut at the stop string. Both give the same replies (tested).

They use the scorer's tokenizer, model, window, padding and forward pass (``_left_pad``,
``_forward``; see :mod:`.scoring`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .progress import progress_bar
from .text import DIALOG_STOP, cut_reply


class GreedyGeneration:
    """Batched greedy generation; mixed into :class:`~.scoring.BatchedScorer`."""

    def prompt_limit(self, max_new_tokens: int) -> int:
        return max(1, min(self.prefix_length, self.window - max_new_tokens))

    def encode_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """Prompt ids, keeping the last tokens that leave room for the generated ones."""
        limit = self.prompt_limit(max_new_tokens)
        encoded = self.tokenizer(list(prompts), verbose=False)["input_ids"] if prompts else []
        return [list(ids)[-limit:] or [self.start_id] for ids in encoded]

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        stop: str = DIALOG_STOP,
        desc: Optional[str] = None,
    ) -> list[str]:
        """Greedy continuations of the prompts, cut at ``stop`` and stripped."""
        encoded = self.encode_prompts(prompts, max_new_tokens)
        new_ids = self._generate_all(encoded, max_new_tokens, stop, desc)
        texts = self.tokenizer.batch_decode([list(t) for t in new_ids], skip_special_tokens=True)
        return [cut_reply(t, stop) for t in texts]

    def _generate_all(self, encoded: list[list[int]], max_new_tokens: int, stop: str, desc: Optional[str]):
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        out: list[list[int]] = [[] for _ in encoded]
        for batch in progress_bar(batches, len(batches), desc):
            ids, mask = self._left_pad([encoded[i] for i in batch])
            new = self._greedy(ids, mask, max_new_tokens, stop)
            for b, i in enumerate(batch):
                out[i] = self._strip_after_eos(new[b].tolist())
        return out

    def _strip_after_eos(self, tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(self.eos_id)] if self.eos_id in tokens else tokens

    def _greedy(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop: Optional[str]) -> torch.Tensor:
        """(batch, <= max_new_tokens) greedy tokens; rows end at eos (then pad) or after ``stop``."""
        with torch.inference_mode():
            if hasattr(self.model, "generate"):
                return self._hf_generate(ids, mask, max_new_tokens, stop)
            return self._plain_greedy(ids, mask, max_new_tokens, stop)

    def _stop_reached(self, new_tokens: torch.Tensor, stop: Optional[str]) -> torch.Tensor:
        if stop is None or new_tokens.shape[1] == 0:
            return torch.zeros(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
        texts = self.tokenizer.batch_decode(new_tokens.tolist(), skip_special_tokens=True)
        return torch.tensor([stop in t for t in texts], dtype=torch.bool, device=new_tokens.device)

    def _hf_generate(self, ids, mask, max_new_tokens, stop):
        from transformers import StoppingCriteria, StoppingCriteriaList

        scorer, start = self, ids.shape[1]

        class _StopString(StoppingCriteria):
            # Per-row: generate pads a finished row and ends the batch when all rows are done.
            def __call__(self, input_ids, scores, **kwargs):
                return scorer._stop_reached(input_ids[:, start:], stop)

        criteria = StoppingCriteriaList([_StopString()]) if stop is not None else None
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            stopping_criteria=criteria,
        )
        return out[:, start:]

    def _plain_greedy(self, ids, mask, max_new_tokens, stop):
        """Greedy decoding for a model without ``generate`` (a bare module): no cache, one full
        forward pass per token."""
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new = ids.new_zeros((ids.shape[0], 0))
        for _ in range(max_new_tokens):
            nxt = self._forward(ids, mask, 1)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            new = torch.cat([new, nxt[:, None]], 1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
            done |= nxt == self.eos_id
            done |= self._stop_reached(new, stop)
            if bool(done.all()):
                break
        return new


class SequentialGeneration(GreedyGeneration):
    """One prompt at a time, no early stop; mixed into :class:`~.scoring.SequentialScorer`."""

    def _generate_all(self, encoded, max_new_tokens, stop, desc):
        out = []
        for row in progress_bar(encoded, len(encoded), desc):
            ids, mask = self._left_pad([row], length=self.prompt_limit(max_new_tokens))
            # No early stop: the reference generates all tokens, then cuts at the stop string.
            new = self._greedy(ids, mask, max_new_tokens, None)
            out.append(self._strip_after_eos(new[0].tolist()))
        return out
