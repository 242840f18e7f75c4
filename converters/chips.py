"""Memory bandwidth of Apple chips, the one table the decode-speed bounds of ``macq inspect`` read.

Decoding one token reads every weight of the decoder and the LM head once, plus the KV cache, so a chip
cannot decode faster than ``bandwidth / bytes read per token``: an upper bound, not a prediction (measured
decoders reach ~35-80% of it). Two columns, because the Neural Engine does not see the SoC's bandwidth:

* ``soc_gbps``: unified-memory bandwidth, what the GPU (MLX, Core ML on the GPU) can read. Apple's
  published specifications, as reported by the press (sources per row).
* ``ane_gbps``: bandwidth the Neural Engine reaches, measured by the community benchmark anemll-bench
  (an LM-head-shaped probe; github.com/Anemll/anemll-bench, Results.MD): ~55-150 GB/s whatever the SoC's.
  ``None`` where no measurement was published. A community measurement, not an Apple specification.

GB/s are 10^9 bytes per second. The same table is printed in the docs (docs/results/coreml-scale.md).
"""

from __future__ import annotations

from dataclasses import dataclass

ANE_SOURCE = "anemll-bench Results.MD (github.com/Anemll/anemll-bench), community measurement"


@dataclass(frozen=True)
class Chip:
    name: str
    soc_gbps: float           # unified-memory bandwidth (GPU side), Apple specification
    soc_source: str
    ane_gbps: float | None    # Neural Engine bandwidth, anemll-bench measurement (None: not published)


CHIPS: tuple[Chip, ...] = (
    Chip("M1", 68.25, "Apple spec via digitalnotebook (M1 family)", 61),
    Chip("M1 Pro", 200, "Apple spec via digitalnotebook (M1 family)", 55),
    Chip("M1 Max", 400, "Apple spec via digitalnotebook (M1 family)", 55),
    Chip("M2", 100, "Apple spec via saltynewsnetwork", 60),
    Chip("M2 Pro", 200, "Apple spec via goodcom/casgirl", None),
    Chip("M2 Max", 400, "Apple spec via goodcom/casgirl", 62),
    Chip("M3", 100, "Apple spec via extremetech/yuwew", 63),
    Chip("M3 Pro", 150, "Apple spec via extremetech/yuwew", None),
    Chip("M3 Max", 400, "Apple spec via extremetech/yuwew (400 for the 16-core CPU part; 300 for the 14-core)", 120),
    Chip("M3 Ultra", 819, "Apple spec via Rapid-MLX#567", None),
    Chip("M4", 120, "Apple spec via macrumors/techmoran", 64),
    Chip("M4 Pro", 273, "Apple spec via macrumors/techmoran", 126),
    Chip("M4 Max", 546, "Apple spec via macrumors/techmoran (up to 546)", 119),
    Chip("M5", 153, "Apple spec via the-decoder", 70),
)


def decode_bounds(bytes_per_token: float) -> list[dict]:
    """Upper bounds on decode tokens/s per chip: bandwidth / bytes read per token, GPU and Neural Engine."""
    rows = []
    for c in CHIPS:
        rows.append({"chip": c.name, "soc_gbps": c.soc_gbps, "gpu_tok_s": c.soc_gbps * 1e9 / bytes_per_token,
                     "ane_gbps": c.ane_gbps,
                     "ane_tok_s": None if c.ane_gbps is None else c.ane_gbps * 1e9 / bytes_per_token})
    return rows
