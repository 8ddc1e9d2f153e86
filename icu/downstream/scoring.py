"""Scoring a causal LM: token log-likelihoods and perplexity (greedy generation: ``generation``).

:class:`BatchedScorer` is the fast path valid.py uses:

* every scoring job is "the log-probability of these target tokens after this input"
  (:meth:`BatchedScorer.score_tokens`); multiple-choice pairs, LAMBADA targets and perplexity
  chunks all reduce to it. Identical inputs share one row (PubMedQA's three one-token answers
  after the same abstract need one forward pass, not three);
* rows are sorted by length and left-padded per batch (dynamic padding), so a batch's target
  tokens end at the same column and the model is asked only for the logits it needs
  (``logits_to_keep``) instead of a (batch, length, vocabulary) tensor;
* position ids come from the attention mask, so a padded row scores exactly like the same row
  alone;
* generation (:mod:`.generation`, mixed in) runs batched with left padding and attention
  masks, and a batch stops as soon as every row has passed the stop string.

:class:`SequentialScorer` is the reference's way: one example per forward pass, every input
padded to a fixed length, full logits. It gives the same numbers (the tests check that) and is
what ``bench/bench_valid.py`` measures the fast path against.

Truncation, shared by both: a context keeps its last ``prefix_length`` tokens, a continuation
its first ``suffix_length``; an input longer than the model's window loses tokens on the left.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .generation import GreedyGeneration, SequentialGeneration
from .progress import progress_bar

logger = logging.getLogger("icu")

# Upper bound on the float32 logits one forward pass may return (elements): 2**27 is 512 MiB,
# about 10 rows of 256 positions over GPT-2's 50257-word vocabulary. Batches shrink to fit.
LOGITS_BUDGET = 2**27

Request = tuple[Sequence[int], Sequence[int]]  # (input ids, target ids)


@dataclass(frozen=True)
class TokenScore:
    """How the model rates a target sequence after its input."""

    logprob: float  # summed log-probability of the target tokens
    greedy: tuple[int, ...]  # the model's argmax token at each target position
    target: tuple[int, ...]

    @property
    def is_greedy(self) -> bool:
        return self.greedy == self.target


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    windows: int  # chunks (or strided windows) scored
    tokens: int  # tokens whose log-probability entered the result
    losses: tuple[float, ...] = ()  # per chunk/window: mean loss (nats) of the tokens it scored
    scored: tuple[int, ...] = ()  # per chunk/window: how many tokens it scored


def model_window(model, tokenizer=None) -> int:
    """The longest input the model takes: its position-embedding size (2048 when unknown)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 2048


class BatchedScorer(GreedyGeneration):
    """Fast, batched scoring of a causal LM (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 32,
        prefix_length: int = 512,
        suffix_length: int = 512,
        window: Optional[int] = None,
        device: Optional[torch.device] = None,
        logits_budget: int = LOGITS_BUDGET,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prefix_length = prefix_length
        self.suffix_length = suffix_length
        self.window = window or model_window(model, tokenizer)
        if device is None:
            first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            device = first.device if first is not None else torch.device("cpu")
        self.device = device
        self.logits_budget = logits_budget
        config = getattr(model, "config", None)
        self.vocab_size = getattr(config, "vocab_size", None) or len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        # The token put before an empty context, so the first target token has a prediction.
        self.start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id
        params = inspect.signature(model.forward).parameters
        self._named = {name for name, p in params.items() if p.kind is not p.VAR_KEYWORD}
        # Without logits_to_keep the model returns logits for every position: batches are then
        # sized for whole rows.
        self._keeps_logits = "logits_to_keep" in self._named
        if prefix_length > self.window:  # once per scorer: valid.py builds one for all tasks
            logger.warning(
                "prefix_length %d exceeds the model window (%d tokens): inputs are truncated "
                "from the left to %d tokens", prefix_length, self.window, self.window,
            )

    # ------------------------------------------------------------------------ encoding

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(context, continuation) strings -> (input ids, target ids) requests.

        The context is tokenized as the tokenizer does by default (a BOS where the model wants
        one), the continuation without special tokens; input = (context + continuation)[:-1]
        cut to the window from the left, target = the continuation's tokens.
        """
        contexts = sorted({c for c, _ in pairs})
        continuations = sorted({c for _, c in pairs})
        ctx_ids = dict(zip(contexts, self.tokenizer(contexts, verbose=False)["input_ids"])) if contexts else {}
        cont_ids = (
            dict(zip(continuations, self.tokenizer(continuations, add_special_tokens=False, verbose=False)["input_ids"]))
            if continuations else {}
        )
        out = []
        for context, continuation in pairs:
            ctx = list(ctx_ids[context])[-self.prefix_length:] or [self.start_id]
            target = list(cont_ids[continuation])[: min(self.suffix_length, self.window)]
            sequence = ctx + target
            out.append((tuple(sequence[:-1][-self.window:]), tuple(target)))
        return out

    def chunk_length(self) -> int:
        """Perplexity chunk length: suffix_length, or the model window when that is shorter."""
        return min(self.suffix_length, self.window)

    def encode_text(self, texts: Sequence[str]) -> list[int]:
        return list(self.tokenizer("\n\n".join(texts), verbose=False)["input_ids"])

    # ---------------------------------------------------------------------- model calls

    def _left_pad(self, rows: Sequence[Sequence[int]], length: Optional[int] = None):
        length = max(length or 0, max(len(r) for r in rows))
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, length - len(row):] = torch.as_tensor(row, dtype=torch.long)
                mask[i, length - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, keep: Optional[int]) -> torch.Tensor:
        """float32 logits of the last ``keep`` positions (all positions when ``keep`` is None)."""
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self._named:
            # Left padding: count positions from each row's first real token.
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if "use_cache" in self._named:
            kwargs["use_cache"] = False
        if keep is not None and "logits_to_keep" in self._named:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        if keep is not None:
            logits = logits[:, -keep:]
        return logits.float()

    @staticmethod
    def _gather(logits: torch.Tensor, target: Sequence[int], greedy: bool = True) -> TokenScore:
        """Score ``target`` against the last len(target) rows of ``logits`` (positions x vocab)."""
        n = len(target)
        if n == 0:
            return TokenScore(0.0, (), ())
        rows = logits[logits.shape[0] - n:]
        ids = torch.as_tensor(target, dtype=torch.long, device=rows.device)
        # log p(t) = logit(t) - logsumexp(logits), without writing an (n, V) log-softmax out;
        # blocks of 64 positions stay in cache (about twice as fast on a CPU for a 255-token
        # perplexity chunk over GPT-2's 50257 words).
        lse = torch.cat([torch.logsumexp(rows[i: i + 64], dim=-1) for i in range(0, n, 64)])
        logp = rows.gather(-1, ids[:, None])[:, 0] - lse
        best = tuple(rows.argmax(-1).tolist()) if greedy else ()
        return TokenScore(float(logp.double().sum()), best, tuple(int(t) for t in target))

    # ------------------------------------------------------------------------- scoring

    def _batches(self, order: Sequence[int], keep: Sequence[int]) -> list[list[int]]:
        """Consecutive groups of ``order`` within batch_size rows and the logits budget
        (``keep[i]``: the logits positions row i needs)."""
        batches: list[list[int]] = []
        current: list[int] = []
        width = 1  # logits positions the current batch needs
        for idx in order:
            wanted = max(width, keep[idx], 1) if current else max(keep[idx], 1)
            if current and (
                len(current) >= self.batch_size
                or (len(current) + 1) * wanted * self.vocab_size > self.logits_budget
            ):
                batches.append(current)
                current, wanted = [], max(keep[idx], 1)
            current.append(idx)
            width = wanted
        if current:
            batches.append(current)
        return batches

    def score_tokens(
        self, requests: Sequence[Request], desc: Optional[str] = None, greedy: bool = True
    ) -> list[TokenScore]:
        """Score each (input ids, target ids): the target is what follows the input's last
        len(target) - 1 tokens, plus one token after the input. ``greedy=False`` skips the
        argmax tokens (``TokenScore.greedy`` is then empty)."""
        rows: dict[tuple[int, ...], int] = {}
        inputs: list[tuple[int, ...]] = []
        keep: list[int] = []
        users: list[list[int]] = []
        for i, (x, target) in enumerate(requests):
            x = tuple(x)
            if len(target) > len(x):
                raise ValueError(f"request {i}: {len(target)} target tokens after {len(x)} input tokens")
            r = rows.get(x)
            if r is None:
                r = rows[x] = len(inputs)
                inputs.append(x)
                keep.append(0)
                users.append([])
            keep[r] = max(keep[r], len(target))
            users[r].append(i)
        # Longest first: similar lengths share a batch (little padding), and a batch too big for
        # memory fails at the start, not after minutes.
        order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))
        widths = keep if self._keeps_logits else [len(x) for x in inputs]
        batches = self._batches(order, widths)
        out: list[Optional[TokenScore]] = [None] * len(requests)
        with torch.inference_mode():
            for batch in progress_bar(batches, len(batches), desc):
                width = max(max(keep[r] for r in batch), 1)
                ids, mask = self._left_pad([inputs[r] for r in batch])
                logits = self._forward(ids, mask, width)
                for b, r in enumerate(batch):
                    for i in users[r]:
                        out[i] = self._gather(logits[b], requests[i][1], greedy)
        return out  # type: ignore[return-value]

    def loglikelihood(
        self, pairs: Sequence[tuple[str, str]], desc: Optional[str] = None, greedy: bool = True
    ) -> list[TokenScore]:
        """Score each continuation after its context (strings)."""
        return self.score_tokens(self.encode_pairs(pairs), desc, greedy)

    # ---------------------------------------------------------------------- perplexity

    def perplexity(self, texts: Sequence[str], stride: Optional[int] = None, desc: Optional[str] = None) -> PerplexityResult:
        """Perplexity of the texts joined with "\\n\\n".

        Default (the reference's definition): non-overlapping chunks of ``chunk_length()``
        tokens, ppl = exp(mean over chunks of the chunk's mean token loss); the first token of
        each chunk is context only. With ``stride`` < chunk length: windows of chunk length
        moved by ``stride`` tokens, each scoring only the tokens not scored before (with the
        rest of the window as context), ppl = exp(total loss / scored tokens).
        """
        ids = self.encode_text(texts)
        length = self.chunk_length()
        if stride is None or stride >= length:
            chunks = [ids[i: i + length] for i in range(0, len(ids), length)]
            chunks = [c for c in chunks if len(c) >= 2]
            if not chunks:
                raise ValueError("the texts give fewer than 2 tokens: nothing to score")
            scores = self.score_tokens([(c[:-1], c[1:]) for c in chunks], desc, greedy=False)
            losses = [-s.logprob / len(s.target) for s in scores]
            return PerplexityResult(math.exp(sum(losses) / len(losses)), len(chunks),
                                    sum(len(c) - 1 for c in chunks), tuple(losses),
                                    tuple(len(s.target) for s in scores))
        requests = []
        scored_until = 1  # token 0 has no prediction
        for begin in range(0, len(ids), stride):
            end = min(begin + length, len(ids))
            if end - scored_until >= 1:
                window = ids[begin:end]
                new = end - scored_until
                requests.append((window[:-1], window[len(window) - new:]))
                scored_until = end
            if end == len(ids):
                break
        if not requests:
            raise ValueError("the texts give fewer than 2 tokens: nothing to score")
        scores = self.score_tokens(requests, desc, greedy=False)
        tokens = sum(len(s.target) for s in scores)
        return PerplexityResult(math.exp(-sum(s.logprob for s in scores) / tokens), len(requests), tokens,
                                tuple(-s.logprob / len(s.target) for s in scores),
                                tuple(len(s.target) for s in scores))


class SequentialScorer(SequentialGeneration, BatchedScorer):
    """The reference's way: one example per forward pass, inputs padded to ``pad_to`` tokens
    (default: prefix_length, or the model window when shorter), logits at every position,
    generation of all ``max_new_tokens`` tokens one prompt at a time. Same numbers, slower."""

    def __init__(self, model, tokenizer, *, pad_to: Optional[int] = None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.pad_to = pad_to or min(self.prefix_length, self.window)

    def score_tokens(
        self, requests: Sequence[Request], desc: Optional[str] = None, greedy: bool = True
    ) -> list[TokenScore]:
        out = []
        with torch.inference_mode():
            for x, target in progress_bar(requests, len(requests), desc):
                if len(target) > len(x):
                    raise ValueError(f"{len(target)} target tokens after {len(x)} input tokens")
                ids, mask = self._left_pad([list(x)], length=self.pad_to)
                logits = self._forward(ids, mask, None)
                out.append(self._gather(logits[0], target, greedy))
        return out
