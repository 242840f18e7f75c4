"""The shared evaluator: perplexity, agreement with the unquantized model, latency, memory, and
weight distortion against the rate-distortion bound. Every quantizer, exporter and benchmark reports
through these functions so their numbers are computed one way."""

from macq.eval.agreement import (
                                 AgreementResult,
                                 ReferenceLogprobs,
                                 agreement,
                                 agreement_from_reference,
                                 reference_logprobs,
)
from macq.eval.distortion import distortion_table, weight_distortion
from macq.eval.latency import LatencyResult, latency
from macq.eval.memory import (
                                 PeakMemory,
                                 cuda_peak_bytes,
                                 current_rss_bytes,
                                 measure_peak,
                                 measure_peak_detail,
                                 model_size_report,
                                 peak_rss_bytes,
)
from macq.eval.perplexity import PerplexityResult, Window, nll_from_logits, perplexity, windows

__all__ = [
    "AgreementResult", "LatencyResult", "PeakMemory", "PerplexityResult", "ReferenceLogprobs", "Window",
    "agreement", "agreement_from_reference", "cuda_peak_bytes", "current_rss_bytes", "distortion_table",
    "latency", "measure_peak", "measure_peak_detail", "model_size_report", "nll_from_logits", "peak_rss_bytes",
    "perplexity", "reference_logprobs", "weight_distortion", "windows",
]
