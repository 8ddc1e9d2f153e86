"""GPT judging of unlearned models' generations (stands apart from ``icu``; no torch).

- ``evaluation.convert``: eval.py ``unlearn.csv`` runs -> one aligned ``results.json``.
- ``evaluation.prompt``: the judging prompt and the "Final score: X" parser.
- ``evaluation.api``: the command line that judges every (target, policy) against any
  OpenAI-compatible server, resumably, and summarises the scores per policy.
- ``evaluation.judge`` (the run and its threads), ``evaluation.request`` (one request with
  retries), ``evaluation.jobs`` (settings and jobs), ``evaluation.cache`` (the JSONL cache),
  ``evaluation.summary`` (per-policy summary), ``evaluation.estimate`` (``--dry_run``).
"""
