"""Reference baselines (bitsandbytes, llm-compressor, fp16) measured by macq's evaluator; see run.py."""

from macq.baselines.run import RUNNERS, BaselineConfig, check_runner, run_baseline

__all__ = ["RUNNERS", "BaselineConfig", "check_runner", "run_baseline"]
