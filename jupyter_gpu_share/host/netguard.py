"""Set up a kernel's network namespace, then exec its sandbox: ``python -I netguard.py SPEC
-- ARGV...``.

pasta starts this inside the kernel's new user and network namespaces, where it may still
change routes and nftables rules; the sandbox it then execs (bubblewrap) drops every
capability before the renter's code runs, so the renter cannot undo any of it. Standard
library only, and run by file path with ``-I``: nothing from the renter's or the host's
environment is imported. It fails closed: any step that does not do what it should ends it
with one line on stderr and exit code 70, and the kernel never starts.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

EXIT_FAILED = 70


def fail(message: str) -> None:
    """Say why the network could not be set up, and end without starting the kernel."""
    sys.stderr.write(f"gpu-share netguard: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_FAILED)


def run(argv: list[str], stdin: str) -> None:
    """Run one setup command, failing closed."""
    try:
        done = subprocess.run(argv, input=stdin.encode(), capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        fail(f"{argv[0]}: {err}")
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        fail(f"{' '.join(argv[:3])} failed: {detail[-1] if detail else done.returncode}")


def wait_for_interface(ifname: str, address: str, timeout: float = 10.0) -> None:
    """Wait until pasta has configured the namespace's interface."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "dev", ifname], capture_output=True, check=False
        )
        if address.encode() in done.stdout:
            return
        if time.monotonic() > deadline:
            fail(f"the namespace's interface {ifname} never got {address}")
        time.sleep(0.02)


def check_routes(expected: int) -> None:
    """Check that every refusal is in the routing table."""
    done = subprocess.run(["ip", "-4", "route", "show", "type", "prohibit"], capture_output=True)
    found = len([line for line in done.stdout.splitlines() if line.strip()])
    if done.returncode != 0 or found < expected:
        fail(f"{found} of {expected} refused routes are in place")


def main(argv: list[str]) -> None:
    """Apply the spec file's routes, rules and limits, then exec the rest of argv."""
    if len(argv) < 3 or argv[1] != "--":
        fail("usage: netguard.py SPEC -- ARGV...")
    try:
        with open(argv[0], encoding="utf-8") as handle:
            spec = json.load(handle)
    except (OSError, ValueError) as err:
        fail(f"cannot read {argv[0]}: {err}")
    wait_for_interface(spec["ifname"], spec["address"])
    run(["ip", "-batch", "-"], spec["routes"])
    check_routes(int(spec["prohibit_count"]))
    run(["nft", "-f", "-"], spec["nft"])
    for which, value in spec.get("rlimits", []):
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        resource.setrlimit(which, (value, value))
    try:
        os.execvp(argv[2], argv[2:])
    except OSError as err:
        fail(f"cannot start {argv[2]}: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
