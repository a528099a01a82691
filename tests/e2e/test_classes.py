"""Classes on loopback: budgets, per-student quotas, class notebooks, usage, fair queueing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from jupyter_gpu_share.ledger import MICRO
from jupyter_gpu_share.store import Store

from .harness import CLI, clean_env, eventually
from .test_bad_input import call

pytestmark = pytest.mark.e2e

PRICE_PER_SECOND = 1000  # 3.6 credits/hour


def cli(cluster, token, *args, **env):
    result = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token, **env),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def setup_class(
    cluster, tmp_path, *, quota="1h", budget_micro=50 * MICRO, students=("ann", "ben", "cat")
):
    """A teacher, a class with students (new accounts), a published starter notebook."""
    teacher = cluster.account("prof", "teacher")
    cli(cluster, teacher, "class", "create", "ml101", "--quota-per-student", quota)
    cluster.admin.request("POST", "/classes/ml101/budget", {"amount_micro": budget_micro})
    out = cli(cluster, teacher, "class", "add-students", "ml101", *students)
    tokens = dict(
        line.split(",")
        for line in out.splitlines()
        if "," in line and not line.startswith("student,")
    )
    starter = nbformat.v4.new_notebook()
    starter.cells = [nbformat.v4.new_code_cell("import os\nprint(os.environ['GPU_SHARE_HOST_ID'])")]
    path = tmp_path / "week1.ipynb"
    nbformat.write(starter, path)
    cli(cluster, teacher, "class", "assign", "ml101", str(path))
    return teacher, tokens


def test_students_run_class_notebooks_charged_to_the_class(make_cluster, tmp_path, monkeypatch):
    cluster = make_cluster()
    cluster.start_host("lab-gpu", "3.6")
    teacher, tokens = setup_class(cluster, tmp_path)
    assert set(tokens) == {"ann", "ben", "cat"}
    cluster.admin.request("POST", "/accounts/ann/credit", {"amount_micro": 7 * MICRO})

    for student in ("ann", "ben"):
        data_dir = tmp_path / f"data-{student}"
        env = {"JUPYTER_DATA_DIR": str(data_dir)}
        out = cli(
            cluster,
            tokens[student],
            "class",
            "fetch",
            "ml101",
            "--dest",
            str(tmp_path / student),
            **env,
        )
        assert "gpu-share-ml101" in out
        notebook = nbformat.read(tmp_path / student / "ml101" / "week1.ipynb", as_version=4)
        assert notebook.metadata["kernelspec"]["name"] == "gpu-share-ml101"
        assert notebook.metadata["gpu_share"]["class"] == "ml101"
        monkeypatch.setenv("JUPYTER_DATA_DIR", str(data_dir))
        monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
        monkeypatch.setenv("GPU_SHARE_TOKEN", tokens[student])
        NotebookClient(notebook, timeout=60, startup_timeout=90).execute()
        assert notebook.cells[0].outputs[0]["text"].strip() == "lab-gpu"

    usage = eventually(
        lambda: (
            (u := cluster.client(teacher).request("GET", "/classes/ml101/usage"))
            and all(not s["running"] for s in u["students"])
            and u
        ),
        20,
        what="class sessions to end",
    )
    by_student = {row["student"]: row for row in usage["students"]}
    total = 0
    for student in ("ann", "ben"):
        sessions = cluster.client(tokens[student]).request("GET", "/sessions")
        assert len(sessions) == 1 and sessions[0]["class"] == "ml101"
        assert sessions[0]["payer"] == "ml101@class"
        assert by_student[student]["seconds"] == sessions[0]["billed_seconds"]
        assert by_student[student]["credits_micro"] == sessions[0]["amount_micro"]
        assert by_student[student]["remaining_seconds"] == 3600 - sessions[0]["billed_seconds"]
        total += sessions[0]["amount_micro"]
    assert by_student["cat"]["seconds"] == 0 and by_student["cat"]["sessions"] == 0
    assert usage["budget_micro"] == 50 * MICRO - total
    # A student's own credits are untouched by class sessions.
    assert cluster.client(tokens["ann"]).request("GET", "/me")["balance_micro"] == 7 * MICRO
    assert cluster.client(tokens["ben"]).request("GET", "/me")["balance_micro"] == 0

    table = cli(cluster, teacher, "class", "usage", "ml101")
    assert "ann" in table and "QUOTA LEFT" in table


async def _run_until_stopped(timeout: float = 40) -> tuple[float, str]:
    km = AsyncKernelManager(kernel_name="gpu-share-ml101")
    await km.start_kernel()
    started = time.monotonic()
    while await km.is_alive():
        assert time.monotonic() - started < timeout, "kernel was never stopped"
        await asyncio.sleep(0.05)
    reason = km.provisioner.bridge.end_reason
    await km.shutdown_kernel(now=True)
    return time.monotonic() - started, reason


def test_student_at_quota_is_stopped_and_cannot_start_again(make_cluster, tmp_path, monkeypatch):
    cluster = make_cluster(minimum_start_seconds=1)
    cluster.start_host("lab-gpu", "3.6")
    _, tokens = setup_class(cluster, tmp_path, quota="4s")
    data_dir = tmp_path / "data"
    cli(
        cluster,
        tokens["ann"],
        "class",
        "fetch",
        "ml101",
        "--dest",
        str(tmp_path),
        JUPYTER_DATA_DIR=str(data_dir),
    )
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data_dir))
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", tokens["ann"])

    lived, reason = asyncio.run(_run_until_stopped())
    assert 3.0 <= lived <= 7.0, lived
    assert "quota" in reason
    session = cluster.session_of(tokens["ann"], "ended")
    assert session["end_reason"] == "quota reached" and session["billed_seconds"] == 4

    status, error = call(
        cluster.url, "POST", "/sessions", tokens["ann"], json.dumps({"class": "ml101"}).encode()
    )
    assert status == 403 and "quota" in error["message"]
    with pytest.raises(RuntimeError, match="quota"):
        asyncio.run(_run_until_stopped())


def test_class_budget_running_out_stops_every_student(make_cluster, tmp_path, monkeypatch):
    cluster = make_cluster(minimum_start_seconds=1)
    cluster.start_host("lab-gpu", "3.6")
    _, tokens = setup_class(cluster, tmp_path, budget_micro=12 * PRICE_PER_SECOND)
    data_dir = tmp_path / "data"
    cli(
        cluster,
        tokens["ann"],
        "class",
        "fetch",
        "ml101",
        "--dest",
        str(tmp_path),
        JUPYTER_DATA_DIR=str(data_dir),
    )
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data_dir))
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)

    async def both() -> list[tuple[float, str]]:
        results = []
        for student in ("ann", "ben"):
            monkeypatch.setenv("GPU_SHARE_TOKEN", tokens[student])
            results.append(asyncio.ensure_future(_run_until_stopped()))
            await asyncio.sleep(0.5)
        return list(await asyncio.gather(*results))

    results = asyncio.run(both())
    for lived, reason in results:
        assert "credit exhausted" in reason
        assert lived < 12
    record = cluster.admin.request("GET", "/classes/ml101")
    assert -2 * PRICE_PER_SECOND <= record["budget_micro"] <= 0
    for student in ("ann", "ben"):
        assert cluster.session_of(tokens[student], "ended")["end_reason"] == "credit exhausted"
        assert cluster.client(tokens[student]).request("GET", "/me")["balance_micro"] == 0


def test_nobody_sees_or_touches_what_is_not_theirs(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_host("lab-gpu", "3.6")
    teacher, tokens = setup_class(cluster, tmp_path)
    other_teacher = cluster.account("dr-other", "teacher")
    cli(cluster, other_teacher, "class", "create", "bio202", "--quota-per-student", "2h")
    url = cluster.url

    # A student sees their class, not the other one, and only their own usage.
    assert [c["name"] for c in call(url, "GET", "/classes", tokens["ann"])[1]] == ["ml101"]
    assert call(url, "GET", "/classes/bio202", tokens["ann"])[0] == 404
    assert call(url, "GET", "/classes/bio202/notebooks", tokens["ann"])[0] == 404
    usage = call(url, "GET", "/classes/ml101/usage", tokens["ann"])[1]
    assert [row["student"] for row in usage["students"]] == ["ann"] and usage[
        "budget_micro"
    ] is None
    assert call(url, "POST", "/classes/ml101/students/ben/stop", tokens["ann"])[0] == 403
    assert (
        call(url, "POST", "/sessions", tokens["ann"], json.dumps({"class": "bio202"}).encode())[0]
        == 404
    )

    # A teacher cannot touch another teacher's class.
    for method, path, body in (
        ("GET", "/classes/ml101/usage", None),
        ("POST", "/classes/ml101/students", json.dumps({"students": ["eve"]}).encode()),
        ("POST", "/classes/ml101/students/ann/stop", None),
        ("DELETE", "/classes/ml101/students/ann", None),
        (
            "PUT",
            "/classes/ml101/notebooks/x.ipynb",
            json.dumps({"cells": [], "nbformat": 4}).encode(),
        ),
        ("POST", "/classes/ml101/budget", b'{"amount_micro": 1}'),
    ):
        assert call(url, method, path, other_teacher, body)[0] == 404, path
    assert "eve" not in cluster.client(teacher).request("GET", "/classes/ml101/students")

    # Bad class input gets a 4xx naming the problem.
    status, error = call(
        url, "POST", "/classes", teacher, json.dumps({"name": "x y", "quota_seconds": 5}).encode()
    )
    assert status == 400 and "class name" in error["message"]
    status, error = call(url, "POST", "/classes", teacher, json.dumps({"name": "nq"}).encode())
    assert status == 400 and "quota" in error["message"]
    status, error = call(
        url, "POST", "/classes", teacher, json.dumps({"name": "ml101", "quota_seconds": 5}).encode()
    )
    assert status == 409
    status, error = call(
        url,
        "POST",
        "/classes",
        tokens["ann"],
        json.dumps({"name": "mine", "quota_seconds": 5}).encode(),
    )
    assert status == 403
    status, error = call(
        url,
        "POST",
        "/classes",
        teacher,
        json.dumps({"name": "rich", "quota_seconds": 5, "budget_micro": 10**9}).encode(),
    )
    assert status == 402


def test_a_burst_of_100_students_gets_kernels_or_queue_places(make_cluster, tmp_path):
    cluster = make_cluster(minimum_start_seconds=1)
    cluster.start_host("small-pool", "3.6", "--max-kernels=3")
    students = [f"s{i:03d}" for i in range(100)]
    _, tokens = setup_class(cluster, tmp_path, students=students, budget_micro=100 * MICRO)
    body = json.dumps({"class": "ml101"}).encode()

    def ask(student: str) -> tuple[str, int, dict, float]:
        started = time.monotonic()
        status, answer = call(cluster.url, "POST", "/sessions", tokens[student], body)
        return student, status, answer, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=25) as pool:
        answers = list(pool.map(ask, students))
    statuses = [status for _, status, _, _ in answers]
    assert set(statuses) <= {201, 429}, statuses
    assert statuses.count(201) == 3
    assert max(elapsed for *_, elapsed in answers) < 10  # nobody hangs
    places = sorted(answer["queue_position"] for _, status, answer, _ in answers if status == 429)
    assert places == list(range(1, 98))
    queued = [(s, a) for s, status, a, _ in answers if status == 429]
    assert all(a["retry_after"] > 0 and "queue" in a["message"] for _, a in queued)

    # The first in line gets the next free kernel; someone further back keeps waiting.
    first = next(s for s, a in queued if a["queue_position"] == 1)
    last = next(s for s, a in queued if a["queue_position"] == 97)
    started = [s for s, status, _, _ in answers if status == 201]
    cluster.client(tokens[started[0]]).request(
        "DELETE", f"/sessions/{cluster.session_of(tokens[started[0]])['id']}"
    )
    assert call(cluster.url, "POST", "/sessions", tokens[last], body)[0] == 429
    assert call(cluster.url, "POST", "/sessions", tokens[first], body)[0] == 201

    for student in [*started[1:], first]:
        session = cluster.session_of(tokens[student])
        cluster.client(tokens[student]).request("DELETE", f"/sessions/{session['id']}")
    store = Store(f"sqlite:///{cluster.workdir / 'broker.sqlite'}")
    try:
        store.check_ledger()
        spent = sum(r.amount_micro or 0 for r in store.list_sessions())
        assert store.balance("ml101@class") == 100 * MICRO - spent
    finally:
        store.close()
