"""What a run tells its caller as it goes: `on_event(kind, value)`, never printed by the library itself (the CLI
draws the progress bars and prints the results from these).

    ("walk", {"pass", "layers", "done"})                a walk (walk.py) begins: `layers` decoder layers, `done`
                                                        of them written by an earlier run
    ("layer", {"pass", "index", "layers", "seconds"})   the walk finished decoder layer `index`
    ("saved", record)                                   the pruned output is complete (api.prune_checkpoint)
    ("perplexity", {"base": ..., "pruned": ...})        --ppl, after saving (finish.py)
    ("evaluation", {model: {task: {metric: value}}})    the recipe's `evaluate:` section
    ("export", {...})                                   one of the recipe's exports
    ("pushed", url)                                     the Hub push
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Event = Callable[[str, Any], None]


def emit(on_event: Event | None, kind: str, value: Any) -> None:
    """Tell `on_event`, if there is one."""
    if on_event is not None:
        on_event(kind, value)
