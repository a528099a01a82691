"""What runs if a client ignores the kernelspec's provisioner and executes its argv."""

from __future__ import annotations

import sys

MESSAGE = (
    "The 'gpu-share' kernel runs on a remote host through the gpu-share kernel provisioner; "
    "this client launched its argv directly. Use jupyter_client >= 7 (JupyterLab, "
    "jupyter_server, nbclient, nbconvert all do)."
)


def main() -> int:
    """Explain why this process should never have been started, and fail."""
    print(MESSAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
