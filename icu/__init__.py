"""ICU: Iterative Contrastive Unlearning for causal language models.

The top-level scripts (data_prep.py, train_neo_meanwhile_update*.py, eval.py, valid.py) are thin
argparse front ends over this package.
"""

__version__ = "0.1.0"
