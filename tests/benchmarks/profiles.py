"""py-spy helpers: find it, and summarise its raw (collapsed-stack) output."""

from __future__ import annotations

import collections
import shutil
import sys
from pathlib import Path
from typing import Any

# Leaf frames where a thread waits for work; py-spy cannot always tell idle threads apart
# inside containers, so these samples are dropped before computing shares.
IDLE_LEAVES = (
    "EpollSelector.select",
    "PollSelector.select",
    "_PollLikeSelector.select",
    "select (",
    "Condition.wait",
    "Event.wait",
    "Poller.poll",
    "Socket.poll",
    "_wait_for_tstate_lock",
)


def pyspy_path() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def _short(frame: str) -> str:
    """'func (path/to/module.py:12)' -> 'func (dir/module.py)', keeping the package for ours."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    if "jupyter_gpu_share/" in path:
        module = "jupyter_gpu_share/" + path.split("jupyter_gpu_share/", 1)[1]
    else:
        module = "/".join(path.split("/")[-2:])
    return f"{name} ({module})"


def summarise_profile(raw: str, top: int = 12) -> dict[str, Any]:
    """Self and inclusive shares of busy samples per function (idle waits left out)."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        leaf = _short(frames[-1])
        if leaf.startswith(IDLE_LEAVES):
            idle += count
            continue
        busy += count
        self_counts[leaf] += count
        for frame in {_short(f) for f in frames}:
            incl_counts[frame] += count
    if busy == 0:
        return {"samples": 0, "idle_samples": idle}
    return {
        "samples": busy,
        "idle_samples": idle,
        "self": [(f, round(c / busy, 3)) for f, c in self_counts.most_common(top)],
        "inclusive_gpu_share": [
            (f, round(c / busy, 3))
            for f, c in incl_counts.most_common()
            if "jupyter_gpu_share/" in f
            and not f.startswith(("main (", "<module> (", "_run_server_verb ("))
        ][:top],
        "inclusive": [(f, round(c / busy, 3)) for f, c in incl_counts.most_common(top * 3)],
    }
