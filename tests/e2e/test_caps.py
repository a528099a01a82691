"""Spending caps enforced by the broker, for every client: a headless run is warned at
80 % and stopped at its cap, with the reason in the cell; the CLI sets and shows them."""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from jupyter_gpu_share.ledger import MICRO

from .harness import clean_env, eventually

pytestmark = pytest.mark.e2e


def cli(cluster, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_gpu_share.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token),
    )


def test_a_session_cap_warns_then_stops_a_headless_run(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_host("host-a", "36")  # 10,000 micro-credits a second
    token = cluster.account("cora", "user", 50 * MICRO)

    shown = cli(cluster, token, "caps")
    assert shown.returncode == 0, shown.stderr
    assert "per session: none" in shown.stdout
    done = cli(cluster, token, "caps", "--session", "0.05")  # 5 s at this price
    assert done.returncode == 0, done.stderr
    assert "per session: 0.05 credits" in done.stdout and "per day:     none" in done.stdout
    bad = cli(cluster, token, "caps", "--day", "-3")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "cap" in bad.stderr

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "gpu-share", "display_name": "gpu-share"}
    nb.cells = [nbformat.v4.new_code_cell("import time\nfor i in range(60):\n    time.sleep(0.5)")]
    path = tmp_path / "long.ipynb"
    nbformat.write(nb, path)
    run = subprocess.run(
        [
            sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
            "--ExecutePreprocessor.kernel_name=gpu-share", "--allow-errors",
            "--output", "out.ipynb", str(path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token),
    )  # fmt: skip
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    outputs = out.cells[0].outputs
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "of your 0.05-credit session spending cap" in stderr, outputs  # the 80 % warning
    errors = [o for o in outputs if o.output_type == "error"]
    assert errors and errors[0]["ename"] == "SessionStopped", (outputs, run.stderr[-2000:])
    assert "spending cap per session" in errors[0]["evalue"]

    session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the end")
    assert session["end_reason"] == "session cap reached"
    # stopped at the cap: billed no more than a second past it
    assert session["amount_micro"] <= 50_000 + session["price_per_second_micro"]
    assert session["billed_seconds"] <= 6
    cleared = cli(cluster, token, "caps", "--session", "none", "--json")
    assert '"session_cap_micro": null' in cleared.stdout
