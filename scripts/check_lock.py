"""Fail if the venv's installed distributions differ from the lock (a missing pin would let pip drift).

Usage: python scripts/check_lock.py requirements/lock.txt   (run by scripts/setup.sh after installing)
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.markers import Marker
from packaging.utils import canonicalize_name
from packaging.version import Version


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    for raw in open(path, encoding="utf-8"):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, _, version = spec.partition("==")
        pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def main(path: str) -> int:
    pins = read_lock(path)
    problems = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ("macq", "pip", "setuptools", "wheel"):
            continue
        want = pins.get(name)
        have = Version(dist.version)
        if want is None:
            problems.append(f"{name}=={dist.version} is installed but not in {path}")
        elif Version(want) != Version(have.base_version if have.local else dist.version):
            problems.append(f"{name}: lock says {want}, installed {dist.version}")
    # The lock is resolved and tested on Linux x86_64 (CI). Elsewhere (macOS) platform packages such as
    # mlx-metal come on top of it: report them, fail only on a version that contradicts a pin.
    strict = sys.platform.startswith("linux")
    failing = [p for p in problems if strict or "lock says" in p]
    for line in problems:
        print(f"lock {'mismatch' if line in failing else 'note'}: {line}", file=sys.stderr)
    if not failing:
        print(f"installed set matches {path} ({len(pins)} pins)")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "requirements/lock.txt"))
