"""The relay as deployed (issue 16): every execute and throughput figure through three
transports in one run, interleaved, and a start and an execute over slow links.

Four clusters, each a broker with its own host agent and user jupyter_server, on loopback:

- ``plain``: http and ws, as the other phases measure;
- ``tls``: the broker serves TLS itself (``--certfile``/``--keyfile``, a CA made for the run
  that every client verifies: ``GPU_SHARE_CA_FILE`` for the user side, ``--ca-file`` for
  the host agent);
- ``nginx``: a plain broker behind nginx, which terminates TLS (``tests/nginx.py``, the
  README's configuration); the user side and the host agent reach the broker through it;
- ``wan``: a plain broker whose user side and host agent each reach it through a slow link
  (``slowlink.py``: 25 ms each way, one round trip to open a connection).

A trivial execute on the local kernel of the plain user server is the baseline of every
ratio; the rounds go through the paths in alternating order, so a slow spell of the machine
falls on all of them.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import Cluster, clean_env, free_port
from tests.nginx import Nginx
from tests.tlsca import ScratchCA

from . import procs, slowlink
from .e2e_phase import TRIVIAL, USER_CREDIT, alternate, log
from .kernelws import ServerKernelClient
from .stats import median, percentile, ratio, rnd

PATHS = ("plain", "tls", "nginx")
LINK_DELAY_MS = 25.0
LINK_ROUND_TRIPS_PER_EXECUTE = 2  # user to broker, and broker to host


class TransportsPhase:
    def __init__(self, workdir: Path, cfg: dict[str, Any]):
        self.workdir = workdir / "transports"
        self.cfg = cfg
        self.results: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []
        self.clusters: dict[str, Cluster] = {}
        self.links: list[subprocess.Popen[str]] = []
        self.nginx: Nginx | None = None
        self.users: dict[str, tuple[str, str]] = {}
        self.hosts: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------------

    def _link(self, upstream_port: int | None) -> str:
        """A slow link to a local port (None: an echo server); its URL."""
        port = free_port()
        if upstream_port is None:
            options = ["--echo"]
        else:
            options = [f"--upstream=127.0.0.1:{upstream_port}", f"--delay-ms={LINK_DELAY_MS}"]
        link = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.slowlink", f"--listen={port}", *options],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.links.append(link)
        assert link.stdout is not None and link.stdout.readline().strip() == "ready"
        return f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca = ScratchCA(self.workdir / "ca")
        pair = ca.issue("broker")
        ca_file = str(ca.ca_file)
        traits = {
            "heartbeat_interval": 5.0,
            "checkpoint_interval": 5.0,
            **{k: v for k, v in self.cfg.get("broker_traits", {}).items() if k != "tls"},
        }
        log("transports: starting four brokers (plain, TLS, behind nginx, over slow links)")
        for name in (*PATHS, "wan"):
            extra = {"tls": (pair.cert, pair.key, ca.ca_file)} if name == "tls" else {}
            (self.workdir / name).mkdir()
            self.clusters[name] = Cluster(self.workdir / name, **traits, **extra)
        self.nginx = Nginx(
            self.workdir / "nginx-proxy",
            f"127.0.0.1:{self.clusters['nginx'].port}",
            pair.cert,
            pair.key,
        )
        wan_user_url = self._link(self.clusters["wan"].port)
        wan_host_url = self._link(self.clusters["wan"].port)
        # What the links cost by themselves: a byte's round trip through the same kind of
        # link to an echo server, once per link an execute crosses.
        echo = int(self._link(None).rsplit(":", 1)[1])
        link = int(self._link(echo).rsplit(":", 1)[1])
        self.link_rtt_ms = slowlink.round_trip_ms(link)
        self.details["wan_link_round_trip_ms"] = rnd(self.link_rtt_ms)
        user_urls = {
            "plain": self.clusters["plain"].url,
            "tls": self.clusters["tls"].url,
            "nginx": self.nginx.url,
            "wan": wan_user_url,
        }
        host_urls = {**user_urls, "wan": wan_host_url}
        spawned = {}
        for name, cluster in self.clusters.items():
            token = cluster.account("bench-user", "user", USER_CREDIT)
            env = clean_env(
                GPU_SHARE_BROKER_URL=user_urls[name],
                GPU_SHARE_TOKEN=token,
                GPU_SHARE_CA_FILE=ca_file,
            )
            spawned[name] = procs.spawn_user_server(cluster, f"user-server-{name}", env)
        for name, cluster in self.clusters.items():
            self.hosts[name] = cluster.start_host(
                "bench-host",
                "3.6",
                "--max-kernels=8",
                "--share-gpus",
                "--no-selftest",
                f"--ca-file={ca_file}",
                broker_url=host_urls[name],
            )
        for name, (_process, url, token) in spawned.items():
            procs.wait_server(url, token)
            self.users[name] = (url, token)
        log("transports: all servers answer")

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.close()
        if self.nginx is not None:
            self.nginx.close()
        for link in self.links:
            link.terminate()
            link.wait(10)

    # -- the figures ----------------------------------------------------------------------

    async def _one(self, kernel: ServerKernelClient) -> float:
        execution = await kernel.execute(TRIVIAL)
        if execution.reply is None or execution.reply.get("status") != "ok":
            raise RuntimeError(f"trivial cell failed: {execution.reply}")
        return execution.elapsed

    def _terminators(self, path: str) -> dict[str, int]:
        """The processes that serve TLS or relay on a path: its broker, and nginx."""
        pids = {"broker": self.clusters[path].broker.pid}
        if path == "nginx" and self.nginx is not None:
            workers = procs.children(self.nginx.process.pid)
            pids["nginx"] = workers[0] if workers else self.nginx.process.pid
        return pids

    async def rtt(self) -> None:
        cfg = self.cfg
        kernels = {"local": ServerKernelClient(*self.users["plain"], "python3")}
        for path in (*PATHS, "wan"):
            kernels[path] = ServerKernelClient(*self.users[path], "gpu-share")
        self.kernels = kernels
        await asyncio.gather(*(k.start() for k in kernels.values()))
        for kernel in kernels.values():
            for _ in range(cfg["rtt_warmup"]):
                await self._one(kernel)
        samples: dict[str, list[float]] = collections.defaultdict(list)
        cpu: dict[str, dict[str, float]] = {p: collections.Counter() for p in PATHS}
        pids = {p: self._terminators(p) for p in PATHS}
        rounds, wan_rounds = cfg["transport_rtt_rounds"], cfg["wan_rtt_rounds"]
        log(f"transports: {rounds} rounds of local, plain, tls, nginx (wan: {wan_rounds})")
        for i in range(rounds):
            names = ["local", *PATHS] + (["wan"] if i < wan_rounds else [])
            for name in alternate(names, i):
                before = {k: procs.cpu_seconds(p) for k, p in pids.get(name, {}).items()}
                samples[name].append(await self._one(kernels[name]) * 1000)
                for k, p in pids.get(name, {}).items():
                    cpu[name][k] += procs.cpu_seconds(p) - before[k]
        med = {n: median(v) for n, v in samples.items()}
        self.details["transport_rtt_ms"] = {
            n: {
                "median": rnd(med[n]),
                "p90": rnd(percentile(v, 90)),
                "p99": rnd(percentile(v, 99)),
                "n": len(v),
            }
            for n, v in samples.items()
        }
        self.details["transport_cpu_ms_per_execute"] = {
            p: {k: rnd(v * 1000 / rounds, 3) for k, v in cpu[p].items()} for p in PATHS
        }
        for path in PATHS:
            self.results[f"{path}_execute_rtt_added_ms"] = rnd(med[path] - med["local"])
            self.results[f"{path}_execute_rtt_median_ratio"] = rnd(ratio(med[path], med["local"]))
        links_ms = LINK_ROUND_TRIPS_PER_EXECUTE * self.link_rtt_ms
        self.results["wan_execute_overhead_ms"] = rnd(med["wan"] - med["local"] - links_ms)
        self.details["wan_execute_ms"] = rnd(med["wan"])

    async def throughput(self) -> None:
        cfg = self.cfg
        chunks = cfg["stdout_mb"] * 10  # 100 KB each
        stdout_code = (
            "import sys\nchunk = 'x' * 100_000\n"
            f"for _ in range({chunks}):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()\n"
        )
        display_bytes = 20 * 2**20
        display_code = (
            "from IPython.display import display\n"
            f"display({{'text/plain': 'x' * {display_bytes}}}, raw=True)\n"
        )
        expected = {"stdout": chunks * 100_000, "display": display_bytes}
        rates: dict[str, list[float]] = collections.defaultdict(list)
        log(f"transports: {cfg['transport_throughput_rounds']} rounds of stdout and display")
        for i in range(cfg["transport_throughput_rounds"]):
            for kind, code in (("stdout", stdout_code), ("display", display_code)):
                for name in alternate(["local", *PATHS], i):
                    size, elapsed = await self._output(self.kernels[name], code, kind)
                    if size != expected[kind]:
                        raise RuntimeError(f"{name}: {kind} of {size} bytes, not {expected[kind]}")
                    rates[f"{kind}_{name}"].append(size / elapsed / 1e6)
        self.details["transport_throughput_mb_s"] = {k: rnd(median(v), 1) for k, v in rates.items()}
        for kind in ("stdout", "display"):
            local = rates[f"{kind}_local"]
            for path in PATHS:
                paired = [r / loc for r, loc in zip(rates[f"{kind}_{path}"], local, strict=True)]
                self.results[f"{path}_{kind}_throughput_ratio"] = rnd(median(paired))

    async def _output(self, kernel: ServerKernelClient, code: str, kind: str) -> tuple[int, float]:
        total = 0

        def on_output(msg_type: str, content: Any) -> None:
            nonlocal total
            if kind == "stdout" and msg_type == "stream":
                total += len(content()["text"])
            elif kind == "display" and msg_type == "display_data":
                total = len(content()["data"]["text/plain"])

        execution = await kernel.execute(code, timeout=300, on_output=on_output)
        return total, execution.elapsed

    async def first_execute(self) -> None:
        """A cold start's first execute on loopback and over the slow links: the difference
        counted in the links' round trips (50 ms each) is what a start waits on them."""
        times: dict[str, list[float]] = collections.defaultdict(list)
        rounds = self.cfg["cold_rounds"] + 1
        log(f"transports: {rounds} cold starts each on loopback and over the slow links")
        for i in range(rounds):
            for name in alternate(["plain", "wan"], i):
                client = ServerKernelClient(*self.users[name], "gpu-share")
                started = time.perf_counter()
                kernel = await client.arest("POST", "/api/kernels", {"name": "gpu-share"})
                created = time.perf_counter()
                client.kernel_id = kernel["id"]
                await client.connect()
                connected = time.perf_counter()
                execution = await client.execute(TRIVIAL, timeout=180)
                assert execution.reply_at is not None
                times[name].append(execution.reply_at - started)
                # Where a start's time goes: the kernel (session, host, kernel_ready), the
                # client's websocket (jupyter_server asks the kernel for its info), and the
                # first execute (behind jupyter_server's nudge of the kernel).
                times[f"{name}_post"].append(created - started)
                times[f"{name}_connect"].append(connected - created)
                times[f"{name}_execute"].append(execution.reply_at - connected)
                await client.shutdown()
                await asyncio.sleep(0.5)
        med = {k: median(v) for k, v in times.items()}
        self.details["wan_first_execute_s"] = {k: rnd(v, 3) for k, v in med.items()}
        round_trip = 2 * LINK_DELAY_MS / 1000  # a link's round trip (user to host: the same)
        self.results["wan_start_round_trips"] = rnd((med["wan"] - med["plain"]) / round_trip, 1)

    async def run_async(self) -> None:
        await self.rtt()
        log(f"transports rtt: {self.details['transport_rtt_ms']}")
        await self.throughput()
        for kernel in self.kernels.values():
            await kernel.shutdown()
        await self.first_execute()

    def run(self) -> None:
        try:
            self.start()
            asyncio.run(self.run_async())
        except BaseException:
            for cluster in self.clusters.values():
                print(cluster.logs()[-8000:], file=sys.stderr)
            if self.nginx is not None and self.nginx.error_log.exists():
                print(self.nginx.error_log.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            self.close()
        self.notes.append(
            "plain/tls/nginx_*: the same trivial execute and outputs through a broker in plain "
            "text, a broker serving TLS itself, and a plain broker behind nginx terminating "
            "TLS, interleaved in one run against a local kernel; wan_*: a broker whose user "
            f"side and host each reach it over a link with {LINK_DELAY_MS:g} ms each way "
            "(wan_execute_overhead_ms: the execute minus the local one minus the links' two "
            "round trips, each measured through the same proxy to an echo server: "
            "wan_link_round_trip_ms; wan_start_round_trips: the first execute's extra time "
            "in 50 ms round trips)"
        )
