"""The notebook's folder on the host and back, through the broker's relay: the files a
notebook reads are there before its first cell, what the kernel writes comes back at
shutdown, a local file changed meanwhile is kept (the kernel's copy beside it), ignored
folders stay behind, and a folder over the limit is refused before anything is rented."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from traitlets.config import Config

from jupyter_gpu_share.files import rules
from jupyter_gpu_share.ledger import MICRO

from .harness import clean_env, eventually
from .test_remote_kernels import nbconvert_execute

pytestmark = pytest.mark.e2e


def notebook(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "gpu-share", "display_name": "gpu-share"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    return nb


def stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def project(root) -> None:
    (root / "data").mkdir()
    (root / "data" / "input.csv").write_text("a,b\n1,2\n3,4\n")
    (root / "notes.txt").write_text("written here\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "big").mkdir()
    (root / "big" / "weights.bin").write_bytes(os.urandom(64 * 1024))
    (root / ".gpushareignore").write_text("# not for the kernel\nbig/\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)


def test_files_go_to_the_kernel_and_come_back(make_cluster, monkeypatch, tmp_path):
    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("fiona", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    root = tmp_path / "project"
    root.mkdir()
    project(root)

    nb = notebook(
        "import os\nprint(open('data/input.csv').read().count('\\n'), os.path.exists('.git'),"
        " os.path.exists('big'), os.access('run.sh', os.X_OK))",
        "os.makedirs('out', exist_ok=True)\nopen('out/result.txt', 'w').write('42\\n')\n"
        "open('notes.txt', 'w').write('written by the kernel\\n')\n"
        "open('data/input.csv', 'a').write('5,6\\n')",
    )
    client = NotebookClient(nb, kernel_name="gpu-share", timeout=60, startup_timeout=90)
    client.resources = {"metadata": {"path": str(root)}}

    async def run() -> None:
        async with client.async_setup_kernel():
            cell = await client.async_execute_cell(nb.cells[0], 0)
            assert stream_text(cell).split() == ["3", "False", "False", "True"]
            await client.async_execute_cell(nb.cells[1], 1)
            # meanwhile, here: notes.txt changes; data/input.csv does not
            (root / "notes.txt").write_text("changed here meanwhile\n")

    asyncio.run(run())

    # at shutdown, what the kernel wrote came back
    assert (root / "out" / "result.txt").read_text() == "42\n"
    assert (root / "data" / "input.csv").read_text() == "a,b\n1,2\n3,4\n5,6\n"
    # both changed it: the local one stays, the kernel's goes beside it
    assert (root / "notes.txt").read_text() == "changed here meanwhile\n"
    assert (root / "notes.gpu-share.txt").read_text() == "written by the kernel\n"
    assert not any(name.endswith(".part") for name in os.listdir(root))
    session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the end")
    assert session["billed_seconds"] >= 1


def test_a_folder_over_the_limit_is_refused_before_renting(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("gus", "user", 50 * MICRO)
    root = tmp_path / "heavy"
    root.mkdir()
    (root / "dataset.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    nbformat.write(notebook("print(1)"), root / "nb.ipynb")

    done = nbconvert_execute(
        root / "nb.ipynb", cluster.url, token, "--GPUShareProvisioner.sync_max_mib=1"
    )
    assert done.returncode != 0
    assert "over the limit of 1.0 MiB" in done.stderr
    assert "dataset.bin" in done.stderr and ".gpushareignore" in done.stderr
    assert "Traceback" not in done.stderr.splitlines()[-1]
    assert cluster.client(token).request("GET", "/sessions") == []  # nothing was rented


def test_a_host_never_writes_through_a_link_the_kernel_made(make_cluster, monkeypatch, tmp_path):
    """The kernel runs while its files arrive: a link it puts where a file will land is
    replaced, not written through (here it points at a file of the test, outside), and
    FIFOs it puts where the host reads make it wait on nothing."""
    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("mal", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched\n")
    root = tmp_path / "p"
    root.mkdir()
    (root / "a.txt").write_text("first\n")
    asyncio.run(_links(root, tmp_path, outside))
    assert outside.read_text() == "untouched\n"
    assert not (tmp_path / "b.txt").exists()


async def _links(root, tmp_path, outside) -> None:
    km = AsyncKernelManager(kernel_name="gpu-share", config=Config())
    await km.start_kernel(cwd=str(root))
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        code = (
            "import os\nos.remove('a.txt')\n"
            f"os.symlink({str(outside)!r}, 'a.txt')\n"
            f"os.symlink({str(tmp_path)!r}, 'sub')\n"
            "os.mkfifo('.gpushareignore')\nos.mkfifo('pipe')\nprint('ok')"
        )
        reply = await client.execute_interactive(code, timeout=30)
        assert reply["content"]["status"] == "ok"
        provisioner = km.provisioner
        (root / "a.txt").write_text("second\n")
        (root / "sub").mkdir()
        (root / "sub" / "b.txt").write_text("into a linked folder?\n")
        entries, _ = rules.scan(str(root), max_bytes=1 << 20)
        files = provisioner.bridge.files
        await provisioner._loop().run(files.put(str(root), entries))
        # FIFOs where the host reads (the ignore file, a file) are passed over, not waited on
        back = await asyncio.wait_for(provisioner._loop().run(files.get()), 30)
        assert back["files"] == 0  # the links the kernel made are not sent back
        assert back["skipped"] >= 2
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=False)


def test_files_come_back_on_demand_through_the_lab_server_and_the_cli(make_cluster):
    from .test_remote_kernels import ServerKernel

    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("hana", "user", 50 * MICRO)
    url, server_token = cluster.start_user_server(token)
    folder = cluster.workdir / "notebooks" / "proj"
    folder.mkdir(parents=True)
    (folder / "data.txt").write_text("from the laptop\n")
    nbformat.write(notebook(), folder / "nb.ipynb")
    lab = ServerKernel(url, server_token)
    model = lab.rest(
        "POST",
        "/api/sessions",
        {"path": "proj/nb.ipynb", "type": "notebook", "kernel": {"name": "gpu-share"}},
    )
    kernel_id = model["kernel"]["id"]

    async def run() -> tuple[dict, str]:
        await lab.connect(kernel_id)
        return await lab.execute(
            "print(open('data.txt').read().strip())\nopen('made.txt', 'w').write('made\\n')"
        )

    reply, text = asyncio.run(run())
    assert reply["status"] == "ok" and text.strip() == "from the laptop"
    session_id = lab.rest("GET", f"/gpu-share/user/kernels/{kernel_id}")["session"]["id"]

    cli = [sys.executable, "-m", "jupyter_gpu_share.cli", "sync"]
    done = subprocess.run(
        [*cli, session_id, "--server", f"{url}?token={server_token}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 file(s)")
    assert (folder / "made.txt").read_text() == "made\n"
    # nothing new since: nothing comes back
    again = lab.rest("POST", "/gpu-share/user/files", {"kernel_id": kernel_id})
    assert again["files"] == 0 and again["message"].startswith("0 file(s)")

    unknown = subprocess.run(
        [*cli, "s-nope", "--server", f"{url}?token={server_token}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1
    assert "no Jupyter server here runs session" in unknown.stderr
    for body in (b"[", b"[]", b'{"kernel_id": 3}', b'{"kernel_id": "a", "session_id": "b"}'):
        request = urllib.request.Request(
            f"{url}/gpu-share/user/files",
            method="POST",
            data=body,
            headers={"Authorization": f"token {server_token}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400


def test_the_lab_server_keeps_a_cells_outputs_for_a_browser_that_comes_back(make_cluster):
    """What a cell printed while no browser was there is kept per cell (kernel/outputs.py),
    so the notebook opened again can show it (the lab part: tests/ui, refresh.spec.ts)."""
    from .test_remote_kernels import ServerKernel, _execute_request

    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("olga", "user", 50 * MICRO)
    url, server_token = cluster.start_user_server(token)
    lab = ServerKernel(url, server_token)
    kernel_id = lab.rest("POST", "/api/kernels", {"name": "gpu-share"})["id"]

    async def run() -> None:
        await lab.connect(kernel_id)
        request = _execute_request(
            "import time\nfor i in range(3): print('line', i, flush=True); time.sleep(0.3)",
            lab.session,
        )
        request["metadata"] = {"cellId": "cell-abc"}
        await lab.ws.write_message(json.dumps(request))
        while True:  # the first line printed: then the browser goes away
            message = json.loads(await lab.ws.read_message())
            if message["msg_type"] == "stream":
                break
        lab.ws.close()

    asyncio.run(run())

    def kept() -> dict:
        answer = lab.rest("GET", f"/gpu-share/user/kernels/{kernel_id}/outputs")
        [execution] = answer["executions"]
        assert execution["done"], execution
        return execution

    execution = eventually(kept, 30, what="the cell's outputs kept")
    assert execution["cell_id"] == "cell-abc" and execution["execution_count"] == 1
    text = "".join(o["content"]["text"] for o in execution["outputs"])
    assert text == "line 0\nline 1\nline 2\n"


def test_the_gpu_share_magic_brings_files_back_from_the_kernel(make_cluster, monkeypatch, tmp_path):
    """%gpu_share sync in a cell: the kernel's files come back, and the next cell says so."""
    cluster = make_cluster()
    cluster.start_host("host-a")
    token = cluster.account("mia", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    root = tmp_path / "m"
    root.mkdir()
    nb = notebook(
        "open('made.txt', 'w').write('by the kernel')\n%gpu_share sync",
        "import time; time.sleep(3)",
        "print('after')",
    )
    client = NotebookClient(nb, kernel_name="gpu-share", timeout=60, startup_timeout=90)
    client.resources = {"metadata": {"path": str(root)}}
    client.execute()
    assert "bringing back this kernel's files" in stream_text(nb.cells[0])
    assert (root / "made.txt").read_text() == "by the kernel"
    told = stream_text(nb.cells[1]) + stream_text(nb.cells[2])
    assert "1 file(s)" in told and "came back" in told, told
