"""Progress bars that disappear when not wanted (tests, --json, non-TTY)."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if not enabled or not sys.stderr.isatty():  # no bars in logs, pipes and CI
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=description, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
