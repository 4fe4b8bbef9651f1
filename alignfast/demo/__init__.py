"""`alignfast demo`: the whole post-training pipeline on a tiny model and a verifiable task, in minutes
on a CPU. task.py (the reversal task, its rewards and records), constitution.py (CAI's principles
and rule-based feedback model), evaluate.py (held-out metrics), pipeline.py (the stages),
report.py (demo.md and the plots)."""
from alignfast.demo.pipeline import DemoResult, Row, run_demo

__all__ = ["DemoResult", "Row", "run_demo"]
