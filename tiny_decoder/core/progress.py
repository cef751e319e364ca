"""Progress of a long loop on the console (stderr), so a minutes-long evaluation or data build never looks hung:
a Rich bar ``LAMBADA 1,234/5,153 passages`` while it runs when stderr is a terminal, else a plain line every
:data:`PLAIN_EVERY_S` seconds; then one closing line with the count and the time, ``LAMBADA: 5,153 passages in
12.3 s``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
PLAIN_EVERY_S = 30.0  # without a terminal: a progress line this often


def console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def track(
    items: Iterable[T],
    total: int,
    label: str,
    unit: str,
    size: Callable[[T], int] = lambda item: 1,
    out: Console | None = None,
) -> Iterator[T]:
    """Yield ``items``, counting ``size(item)`` of ``total`` ``unit`` (e.g. the passages of each batch)."""
    out = out or console()
    started = last = time.perf_counter()
    done = 0
    if out.is_terminal:
        columns = (TextColumn(f"{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn())
        with Progress(*columns, console=out, transient=True) as progress:
            task = progress.add_task(label, total=total)
            for item in items:
                yield item
                done += size(item)
                progress.update(task, completed=done)
    else:
        for item in items:
            yield item
            done += size(item)
            if time.perf_counter() - last >= PLAIN_EVERY_S:
                last = time.perf_counter()
                out.print(f"{label} {done:,}/{total:,} {unit} ({last - started:.0f} s)")
    out.print(f"{label}: {done:,} {unit} in {time.perf_counter() - started:.1f} s")
