"""What a run tells its caller as it goes: `on_event(kind, value)`, never printed by the library itself (the CLI
draws the progress bars and prints the results from these).

    ("walk", {"pass", "layers", "done"})                a walk (walk.py) begins: `layers` decoder layers, `done`
                                                        of them written by an earlier run
    ("layer", {"pass", "index", "layers", "seconds"})   the walk finished decoder layer `index`
    ("progress", {"what", "done", "total", "unit"})     any other long loop (whole-model stages, perplexity,
                                                        exports): as it begins (done 0) and after each item
    ("saved", record)                                   the pruned output is complete (api.prune_checkpoint)
    ("perplexity", {"base": ..., "pruned": ...})        --ppl, after saving (finish.py)
    ("evaluation", {model: {task: {metric: value}}})    the recipe's `evaluate:` section
    ("export", {...})                                   one of the recipe's exports
    ("deployment", {...})                               export.speed: the GGUF export and the dense one, timed
    ("pushed", url)                                     the Hub push
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

Event = Callable[[str, Any], None]
T = TypeVar("T")


def emit(on_event: Event | None, kind: str, value: Any) -> None:
    """Tell `on_event`, if there is one."""
    if on_event is not None:
        on_event(kind, value)


def progress(items: Iterable[T], on_event: Event | None, what: str, unit: str, total: int | None = None) -> Iterator[T]:
    """`items`, one by one, telling `on_event` ("progress") how many are done: as the loop begins and after each."""
    total = len(items) if total is None else total
    emit(on_event, "progress", {"what": what, "done": 0, "total": total, "unit": unit})
    for done, item in enumerate(items, 1):
        yield item
        emit(on_event, "progress", {"what": what, "done": done, "total": total, "unit": unit})
