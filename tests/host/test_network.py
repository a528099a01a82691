"""A kernel's own network: the rules as plain functions, then a real namespace built by
pasta and netguard around a real bubblewrap sandbox."""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from jupyter_gpu_share.host import netguard
from jupyter_gpu_share.host.network import (
    HostNetworks,
    NetworkConfigError,
    NetworkPolicy,
    blocked_networks,
    guard_spec,
    inner_subnet,
    missing_tools,
    nft_ruleset,
    parse_network,
    pasta_argv,
    read_host_networks,
    route_batch,
)

N = ipaddress.IPv4Network


def test_parse_modes_and_allowlist() -> None:
    assert parse_network("none").mode == "none"
    assert not parse_network("none").needs_stack
    assert parse_network(" public ").mode == "public"
    policy = parse_network("192.0.2.7, 198.51.100.0/24", bandwidth_kbit=8000)
    assert policy.mode == "allowlist"
    assert policy.allow == (N("192.0.2.7/32"), N("198.51.100.0/24"))
    assert "8000 kbit/s" in policy.describe()
    assert parse_network("localhost").allow == (N("127.0.0.1/32"),)


@pytest.mark.parametrize("bad", ["", ",", "fe80::1", "a b", "x" * 300, ",".join(["1.1.1.1"] * 65)])
def test_parse_refuses_bad_lists(bad: str) -> None:
    with pytest.raises(NetworkConfigError):
        parse_network(bad)


def test_negative_limits_are_refused() -> None:
    with pytest.raises(NetworkConfigError):
        NetworkPolicy("public", bandwidth_kbit=-1)


def test_blocked_covers_private_ranges_and_the_hosts_own() -> None:
    host = HostNetworks((N("203.0.113.9/32"),), (N("203.0.113.0/24"), N("8.8.4.0/24")))
    blocked = blocked_networks(host)

    def is_blocked(addr: str) -> bool:
        return any(ipaddress.IPv4Address(addr) in net for net in blocked)

    for addr in (
        "127.0.0.1",
        "10.1.2.3",
        "172.20.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.251",
        "203.0.113.9",
        "203.0.113.200",
        "8.8.4.4",
    ):
        assert is_blocked(addr), addr
    for addr in ("1.1.1.1", "151.101.0.223", "8.8.8.8"):
        assert not is_blocked(addr), addr
    # the host's 203.0.113.0/24 is taken, so the namespace gets another documentation range
    assert inner_subnet(host) == N("198.51.100.0/24")
    crowded = HostNetworks((), (N("198.51.100.0/24"), N("203.0.113.0/24"), N("192.0.2.0/24")))
    with pytest.raises(NetworkConfigError):
        inner_subnet(crowded)


def test_rules_text() -> None:
    host = HostNetworks((N("192.0.2.2/32"),), (N("192.0.2.0/24"),))
    spec = guard_spec(parse_network("public", connections_per_minute=60), host)
    assert spec.subnet == "198.51.100.0/24" and spec.gateway == "198.51.100.1"
    routes = route_batch(spec)
    assert "route replace prohibit 10.0.0.0/8" in routes
    assert "route replace prohibit 192.0.2.0/24" in routes
    assert "route del default" not in routes
    rules = nft_ruleset(spec)
    assert "ct state new limit rate over 60/minute" in rules
    assert "meta nfproto ipv6 drop" in rules
    allow = guard_spec(parse_network("1.1.1.1"), host)
    assert "route del default" in route_batch(allow)
    assert "1.1.1.1/32 via 198.51.100.1" in route_batch(allow)
    assert "@allowed" in nft_ruleset(allow)
    argv = pasta_argv("pasta", spec, "/tmp/log")
    assert "--no-map-gw" in argv and "-4" in argv and argv[-1] == "--"
    for flag in ("--tcp-ports", "--udp-ports", "--tcp-ns", "--udp-ns"):
        assert argv[argv.index(flag) + 1] == "none"


def test_spec_round_trips() -> None:
    host = HostNetworks((), ())
    spec = guard_spec(parse_network("public"), host, rlimits=[(6, 64)])
    assert type(spec).from_json(spec.to_json()) == spec


# -- a real namespace ------------------------------------------------------------------

NEEDED = ("pasta", "bwrap", "ip", "nft")
real = pytest.mark.skipif(
    sys.platform != "linux" or any(shutil.which(t) is None for t in NEEDED),
    reason="needs pasta (passt), bubblewrap, iproute2 and nftables",
)

PROBE = r"""
import json, socket, sys
port = int(sys.argv[1]); out = {}
for name, addr in [("host_loopback", "127.0.0.1"), ("gateway", sys.argv[2]),
                   ("host_address", sys.argv[3])]:
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((addr, port)); s.send(b"GET / HTTP/1.0\r\n\r\n"); out[name] = s.recv(64).decode()
    except OSError as err:
        out[name] = "refused: " + type(err).__name__
    finally:
        s.close()
out["proc_net_tcp_lines"] = len(open("/proc/net/tcp").read().splitlines())
print(json.dumps(out))
"""


def _listener() -> tuple[socket.socket, threading.Thread]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))  # the host's loopback and its own addresses
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"HOST-SECRET")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@real
def test_kernel_namespace_reaches_nothing_of_the_host() -> None:
    """pasta + netguard + bwrap, as the agent chains them: a listener on every address of
    the host is out of reach; the route to the public internet is there."""
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="gpu-share-net-"))  # reachable by 65533
    os.chmod(tmp_path, 0o755)
    # the chain runs as another uid, which may not read the venv's interpreter under /root
    python = (
        sys.executable
        if os.geteuid() != 0
        else (shutil.which("python3", path="/usr/bin") or pytest.skip("no /usr/bin/python3"))
    )
    shutil.copy(netguard.__file__, tmp_path / "netguard.py")
    if not os.path.exists("/dev/net/tun") or os.stat("/dev/net/tun").st_mode & 0o006 != 0o006:
        pytest.skip("/dev/net/tun is missing or not open to other users (stock mode is 0666)")
    host = read_host_networks()
    host_addr = next(
        (str(a.network_address) for a in host.addresses if not a.network_address.is_loopback),
        "127.0.0.1",
    )
    spec = guard_spec(parse_network("public", connections_per_minute=600), host)
    guard_file = tmp_path / "guard.json"
    guard_file.write_text(
        json.dumps(
            {
                "ifname": "eth0",
                "address": spec.address,
                "routes": route_batch(spec),
                "prohibit_count": len(spec.blocked),
                "nft": nft_ruleset(spec),
                "rlimits": [],
            }
        )
    )
    server, _thread = _listener()
    port = server.getsockname()[1]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    os.chmod(tmp_path, 0o755)
    bwrap = [
        "bwrap",
        "--unshare-user",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--cap-drop",
        "ALL",
        "--unshare-pid",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--",
    ]
    checks = (
        "ip -4 route get 1.1.1.1; ip -4 route get 10.0.0.1 2>&1; "
        "ip route add 10.0.0.0/8 dev eth0 2>&1; nft flush ruleset 2>&1; "
        f"{python} -I {probe} {port} {spec.gateway} {host_addr}"
    )
    argv = [
        *pasta_argv("pasta", spec, str(tmp_path / "pasta.log")),
        python,
        "-I",
        str(tmp_path / "netguard.py"),
        str(guard_file),
        "--",
        *bwrap,
        "sh",
        "-c",
        checks,
    ]
    preexec = None
    if os.geteuid() == 0:  # pasta refuses root: the chain starts as an unprivileged uid
        os.chmod(guard_file, 0o644)
        os.chown(tmp_path, 65533, 65533)  # pasta writes its log there

        def preexec() -> None:
            os.setgroups([])
            os.setresgid(65533, 65533, 65533)
            os.setresuid(65533, 65533, 65533)

    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=60, preexec_fn=preexec, cwd="/", check=False
        )
    finally:
        server.close()
        shutil.rmtree(tmp_path, ignore_errors=True)
    text = done.stdout.decode()
    assert done.returncode == 0, (text, done.stderr.decode())
    lines = text.strip().splitlines()
    result = json.loads(lines[-1])
    assert "1.1.1.1 via 198.51.100.1 dev eth0" in text or f"via {spec.gateway}" in lines[0]
    assert "HOST-SECRET" not in text
    for name in ("host_loopback", "gateway", "host_address"):
        assert result[name].startswith("refused"), result
    assert result["proc_net_tcp_lines"] <= 3  # none of the host's sockets
    assert "Operation not permitted" in text  # the renter cannot add a route or flush rules


@real
def test_netguard_fails_closed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A guard that cannot set its rules never starts the kernel."""
    bad = tmp_path / "guard.json"
    bad.write_text(
        json.dumps(
            {
                "ifname": "lo",
                "address": "127.0.0.1",
                "routes": "route add bogus\n",
                "prohibit_count": 1,
                "nft": "",
                "rlimits": [],
            }
        )
    )
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            sys.executable,
            "-I",
            netguard.__file__,
            str(bad),
            "--",
            "echo",
            "KERNEL-STARTED",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == netguard.EXIT_FAILED
    assert b"KERNEL-STARTED" not in done.stdout
    assert done.stderr.decode().startswith("gpu-share netguard:")


def test_missing_tools_named() -> None:
    assert missing_tools(parse_network("none")) == []
