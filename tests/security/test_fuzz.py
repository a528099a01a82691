"""Schemathesis over every operation of the broker's OpenAPI document, as each role.

Sized to finish in under a minute: each operation gets a few generated cases (valid and
invalid), and every response is checked against the document (status codes, content types,
schemas) and for 5xx. The counts are printed for the CI log.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed (test extra)")
@pytest.mark.parametrize("role", ["admin", "user", "teacher"])
def test_every_operation_answers_as_documented(make_cluster, role: str, security_counts) -> None:
    cluster = make_cluster(requests_per_minute=0)
    token = cluster.admin_token if role == "admin" else cluster.account(f"fuzz-{role}", role)
    done = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{cluster.url}/gpu-share/api/openapi.json",
            "--url",
            cluster.url,
            "-H",
            f"Authorization: Bearer {token}",
            "--checks",
            "all",
            "--max-examples",
            "10",
            "--phases",
            "examples,fuzzing",
            "--no-color",
            "--seed",
            "1",
            "--generation-database",
            "none",  # the same cases in every clone: no examples remembered between runs
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = done.stdout[done.stdout.rfind("SUMMARY") :]
    cases = re.search(r"(\d+) generated", summary)
    failures = re.search(r"(\d+) found", summary)
    fivexx = done.stdout.count("Server error")
    line = (
        f"schemathesis as {role}: {cases.group(1) if cases else '?'} cases, "
        f"{failures.group(1) if failures else 0} failures, {fivexx} 5xx"
    )
    security_counts.append(line)
    print(line)
    assert "Traceback" not in cluster.broker.output()
    assert done.returncode == 0, done.stdout[-6000:]
