"""``jupyter gpu-share`` under uvloop: for ``run.py --uvloop`` (an experiment, not a feature)."""

from __future__ import annotations

import asyncio
import sys

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

from jupyter_gpu_share.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
