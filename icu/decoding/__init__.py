"""Fast greedy and beam decoding for the forget-set metrics (:mod:`icu.forget_eval`).

The modules, leaves first:

* :mod:`.hf` - Hugging Face plumbing: unwrapping engines, cache argument and cache layers,
  eos ids, the model body and its output layer;
* :mod:`.head` - the output layer applied tile by tile (running argmax, log-sum-exp, top k),
  so batch x length x vocabulary logits are never stored;
* :mod:`.forward` - one forward pass (argmax, key/value cache, token losses) through that head;
* :mod:`.kv_cache` - a key/value cache that writes new positions into a preallocated buffer;
* :mod:`.continuations` - the greedy continuations of the EL prefixes, decoded only where the
  model leaves the text;
* :mod:`.beam` - the generation check's beam search (a lean one, or ``generate``).

Greedy tokens follow generate's conventions: ``torch.argmax`` (the first maximum on ties) of the
raw logits; once a continuation emits an eos token the rest is the pad token. Logits processors
that a model's generation_config may add (repetition penalty, suppressed tokens) are not applied
by the greedy path: the models ICU uses (GPT-Neo, OPT, GPT-2) have none; the beam search hands
such models to ``generate``.
"""
