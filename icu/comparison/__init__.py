"""compare.py's library: the per-method config, the steps that train and evaluate a method, the
run over all methods (resumable), and the report (table, plot, results.json)."""

from .config import DEFAULT_CONFIG, ORIGINAL, MethodConfig, known_methods, load_method_config, parse_methods
from .report import write_report
from .runner import Plan, make_plan, run_comparison

__all__ = [
    "DEFAULT_CONFIG", "ORIGINAL", "MethodConfig", "known_methods", "load_method_config", "parse_methods",
    "write_report", "Plan", "make_plan", "run_comparison",
]
