"""GPT judging of unlearned models' generations (stands apart from ``icu``; no torch).

- ``evaluation.convert``: eval.py ``unlearn.csv`` runs -> one aligned ``results.json``.
- ``evaluation.prompt``: the judging prompt and the "Final score: X" parser.
- ``evaluation.api``: judge every (target, policy) against any OpenAI-compatible server,
  resumably, and summarise the scores per policy.
"""
