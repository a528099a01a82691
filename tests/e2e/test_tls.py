"""TLS as deployed (issue 16, item 2): the broker serves TLS from its own flags; every client
verifies the certificate and the host name, trusts a CA of the deployment's own only when
told (--ca-file, GPU_SHARE_CA_FILE), and says in one line what was wrong."""

from __future__ import annotations

import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

from jupyter_gpu_share.client import BrokerClient, BrokerError
from jupyter_gpu_share.ledger import MICRO

from ..nginx import Nginx, nginx_path
from ..tlsca import ScratchCA
from .harness import CLI, ROOT_FLAG, clean_env, eventually, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def ca(tmp_path) -> ScratchCA:
    return ScratchCA(tmp_path / "ca")


def run_notebook(*cells: str) -> nbformat.NotebookNode:
    """Run code cells on the gpu-share kernel (broker, token and CA from the environment)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "gpu-share", "display_name": "x", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(code) for code in cells]
    NotebookClient(nb, kernel_name="gpu-share", timeout=120, startup_timeout=90).execute()
    return nb


def test_a_notebook_runs_through_a_tls_broker_of_a_private_ca(make_cluster, ca, monkeypatch):
    """The whole path over TLS, certificates verified: CLI, host agent, user-side bridge."""
    server = ca.issue("broker")
    cluster = make_cluster(tls=(server.cert, server.key, ca.ca_file))
    assert cluster.url.startswith("https://")
    cluster.start_host("tlshost")  # the agent verifies against GPU_SHARE_CA_FILE
    token = cluster.account("secure", "user", 50 * MICRO)
    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", token)
    monkeypatch.setenv("GPU_SHARE_CA_FILE", str(ca.ca_file))
    big = "from IPython.display import display\ndisplay({'text/plain': 'x' * (20 << 20)}, raw=True)"
    nb = run_notebook("print(6 * 7)", big)
    assert nb.cells[0].outputs[0]["text"].strip() == "42"
    # One 20 MiB message, past the broker's 17 MiB read buffer (which once killed the relay
    # over TLS when a large frame's rest was read in one piece).
    assert len(nb.cells[1].outputs[0]["data"]["text/plain"]) == 20 << 20
    session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the bill")
    assert session["billed_seconds"] >= 1
    # The CLI, with the CA given by flag rather than the environment.
    env = clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=token)
    out = subprocess.run(
        [*CLI, "balance", "--ca-file", str(ca.ca_file)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in cluster.broker.output()


@pytest.mark.skipif(nginx_path() is None, reason="nginx is not installed (.ci/run installs it)")
def test_a_notebook_runs_through_nginx_terminating_tls(make_cluster, ca, tmp_path, monkeypatch):
    """The README's nginx in front of a plain broker: the host agent (--ca-file) and the
    user side reach the broker only through it, websockets included."""
    cluster = make_cluster()
    server = ca.issue("proxy")
    proxy = Nginx(tmp_path / "nginx", f"127.0.0.1:{cluster.port}", server.cert, server.key)
    try:
        cluster.start_host("proxied", "3.6", f"--ca-file={ca.ca_file}", broker_url=proxy.url)
        token = cluster.account("behind-proxy", "user", 50 * MICRO)
        monkeypatch.setenv("GPU_SHARE_BROKER_URL", proxy.url)
        monkeypatch.setenv("GPU_SHARE_TOKEN", token)
        monkeypatch.setenv("GPU_SHARE_CA_FILE", str(ca.ca_file))
        big = "print(len('y' * (8 << 20)))\nfrom IPython.display import display\n"
        big += "display({'text/plain': 'x' * (8 << 20)}, raw=True)"
        nb = run_notebook("print(6 * 7)", big)
        assert nb.cells[0].outputs[0]["text"].strip() == "42"
        assert len(nb.cells[1].outputs[1]["data"]["text/plain"]) == 8 << 20
        session = eventually(lambda: cluster.session_of(token, "ended"), 20, what="the bill")
        assert session["billed_seconds"] >= 1
    finally:
        proxy.close()
    assert "Traceback" not in cluster.broker.output()


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("untrusted", "unable to get local issuer certificate"),
        ("self-signed", "self-signed certificate"),
        ("wrong-name", "IP address mismatch"),
        ("expired", "certificate has expired"),
    ],
)
def test_a_certificate_that_cannot_be_trusted_is_refused_in_one_line(
    make_cluster, ca, tmp_path, kind, said
):
    if kind == "self-signed":
        server = ca.issue("broker", self_signed=True)
    elif kind == "wrong-name":
        server = ca.issue("broker", hosts=("broker.example.org",))
    elif kind == "expired":
        server = ca.issue("broker", expired=True)
    else:
        server = ScratchCA(tmp_path / "other-ca").issue("broker")  # a CA the client never heard of
    cluster = make_cluster(tls=(server.cert, server.key, ca.ca_file))
    admin = BrokerClient(cluster.url, cluster.admin_token, timeout=10, ca_file=str(ca.ca_file))
    with pytest.raises(BrokerError) as refused:
        admin.request("GET", "/me")
    message = refused.value.message
    assert said in message and "127.0.0.1" in message, message
    if kind in ("untrusted", "self-signed"):
        assert "--ca-file" in message, message
    # The CLI says the same in one line, exit code 1, no traceback.
    env = clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=cluster.admin_token)
    out = subprocess.run(
        [*CLI, "balance", "--ca-file", str(ca.ca_file)], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0 and said in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # A host agent retries, saying why each time.
    host = cluster.spawn(
        "host-refused",
        [*CLI, "host", "--broker", cluster.url, f"--scratch-root={tmp_path / 'scratch'}"],
        clean_env(GPU_SHARE_TOKEN="gs_" + "x" * 43),
    )
    eventually(lambda: said in host.output(), 30, what="the agent's reason")
    assert "Traceback" not in host.output()


def test_a_missing_ca_file_is_a_one_line_error(tmp_path):
    env = clean_env(GPU_SHARE_BROKER_URL="https://127.0.0.1:1", GPU_SHARE_TOKEN="gs_x")
    missing = str(tmp_path / "nope.pem")
    out = subprocess.run(
        [*CLI, "balance", "--ca-file", missing], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0 and f"cannot use the CA file {missing}" in out.stderr
    assert "Traceback" not in out.stderr
    host = subprocess.run(
        [*CLI, "host", "--broker", "https://127.0.0.1:1", "--ca-file", missing],
        env={**env, "GPU_SHARE_TOKEN": "gs_" + "x" * 43},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert host.returncode != 0 and "cannot use the CA file" in host.stderr + host.stdout
    assert "Traceback" not in host.stderr


def test_the_broker_warns_when_it_listens_beyond_loopback_in_clear(make_cluster):
    cluster = make_cluster(tls=None)
    assert "without TLS" not in cluster.broker.output()  # 127.0.0.1: nothing to say
    from jupyter_gpu_share.broker.app import plain_text_warning

    assert plain_text_warning("0.0.0.0", tls=False, unix_socket=False)
    assert plain_text_warning("", tls=False, unix_socket=False)
    assert plain_text_warning("10.1.2.3", tls=False, unix_socket=False)
    assert plain_text_warning("0.0.0.0", tls=True, unix_socket=False) is None
    assert plain_text_warning("::1", tls=False, unix_socket=False) is None
    assert plain_text_warning("localhost", tls=False, unix_socket=False) is None


def test_a_broker_on_every_interface_without_tls_says_so(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            *CLI,
            "broker",
            f"--port={port}",
            "--ServerApp.ip=0.0.0.0",
            "--ServerApp.port_retries=0",
            f"--db=sqlite:///{tmp_path / 'broker.sqlite'}",
            f"--ServerApp.root_dir={tmp_path}",
            f"--BrokerApp.receipt_key_file={tmp_path / 'key.pem'}",
            *ROOT_FLAG,
        ],
        env=clean_env(GPU_SHARE_ADMIN_TOKEN="gs_" + "a" * 43),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "without TLS" in line:
                assert "0.0.0.0" in line and "--certfile" in line, line
                break
            if "gpu-share broker ready" in line:
                pytest.fail("the broker started on 0.0.0.0 without a word about TLS")
    finally:
        process.terminate()
        process.wait(20)
