"""Run the lab extension's unit tests (vitest: money, filters, the meter) with the Python suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LABEXTENSION = Path(__file__).resolve().parents[2] / "labextension"


def test_labextension_unit_tests() -> None:
    """`jlpm test` in labextension/ passes."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    jlpm = shutil.which("jlpm", path=path)
    if jlpm is None:
        pytest.skip("jlpm (from jupyterlab) is not installed")
    env = {**os.environ, "PATH": path, "CI": "1"}
    if not (LABEXTENSION / "node_modules" / ".bin" / "vitest").exists():
        subprocess.run([jlpm, "install"], cwd=LABEXTENSION, env=env, check=True)
    result = subprocess.run(
        [jlpm, "test"],
        cwd=LABEXTENSION,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_labextension_lint() -> None:
    """`jlpm lint:check` (prettier and ESLint, as in the extension template) passes."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: cannot run prettier and ESLint")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    jlpm = shutil.which("jlpm", path=path)
    if jlpm is None:
        pytest.skip("jlpm (from jupyterlab) is not installed")
    env = {**os.environ, "PATH": path, "CI": "1"}
    if not (LABEXTENSION / "node_modules" / ".bin" / "eslint").exists():
        subprocess.run([jlpm, "install"], cwd=LABEXTENSION, env=env, check=True)
    result = subprocess.run(
        [jlpm, "lint:check"],
        cwd=LABEXTENSION,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
