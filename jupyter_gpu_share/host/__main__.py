"""Run the host agent: ``python -m jupyter_gpu_share.host``."""

from __future__ import annotations

from .app import main

if __name__ == "__main__":
    main()
