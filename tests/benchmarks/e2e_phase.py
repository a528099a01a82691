"""The end-to-end figures: execute round trips, output throughput, first-execute times.

Real processes on loopback: the e2e harness's broker and host agent, a user jupyter_server
with the user-side extension, two Kernel Gateways with a gateway-mode jupyter_server in front
of each (stock, and with TCP_NODELAY everywhere), and local kernels driven by jupyter_client.
Every comparison is measured in the same rounds, alternating the order of the sides each
round, so load from the noisy machine falls on both sides of a ratio.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import Cluster, clean_env

from . import procs
from .kernelws import DirectKernelClient, RelayKernelClient, ServerKernelClient
from .profiles import pyspy_path, summarise_profile
from .stats import (
    median,
    median_difference_interval,
    paired_median_difference,
    percentile,
    ratio,
    rnd,
)

TRIVIAL = "x = 1"
USER_CREDIT = 10**15


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def alternate(items: list[Any], round_index: int) -> list[Any]:
    """The items in order on even rounds, reversed on odd ones."""
    return list(items) if round_index % 2 == 0 else list(reversed(items))


def warm_pool_option() -> bool:
    """Whether the host agent has a --warm-kernels option (issue 5, part 2)."""
    out = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu_share.cli", "host", "--help-all"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "--warm-kernels" in out.stdout + out.stderr


class E2EPhase:
    def __init__(self, workdir: Path, cfg: dict[str, Any]):
        self.workdir = workdir
        self.cfg = cfg
        self.results: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []
        self.cluster: Cluster | None = None

    # -- set-up ---------------------------------------------------------------------------

    def start_processes(self) -> None:
        (self.workdir / "e2e").mkdir(parents=True, exist_ok=True)
        log("starting broker")
        cluster = self.cluster = Cluster(
            self.workdir / "e2e",
            heartbeat_interval=5.0,
            checkpoint_interval=5.0,
            **self.cfg.get("broker_traits", {}),
        )
        self.user_token = cluster.account("bench-user", "user", USER_CREDIT)
        log("starting host agent, user server, kernel gateways")
        # Spawn everything that takes seconds to import, then wait for all of it.
        self.user_proc, self.user_url, self.user_tok = procs.spawn_user_server(
            cluster,
            "user-server",
            clean_env(GPU_SHARE_BROKER_URL=cluster.url, GPU_SHARE_TOKEN=self.user_token),
        )
        stock_cfg = procs.config_dir(
            self.workdir,
            "gw-stock",
            {"jupyter_server_config.py": procs.WITHOUT_GPU_SHARE_EXTENSION},
        )
        nodelay_cfg = procs.config_dir(
            self.workdir,
            "gw-nodelay",
            {
                "jupyter_server_config.py": procs.NODELAY_EVERYWHERE,
                "jupyter_kernel_gateway_config.py": procs.NODELAY_EVERYWHERE,
            },
        )
        self.gateways: dict[str, tuple[str, str]] = {}
        kg_urls = {}
        for name, cfgdir in (("stock", stock_cfg), ("nodelay", nodelay_cfg)):
            env = clean_env(JUPYTER_CONFIG_DIR=str(cfgdir))
            _, kg_urls[name] = procs.spawn_kernel_gateway(cluster, f"kg-{name}", env)
        self.host_proc = cluster.start_host(
            "bench-host", "3.6", "--max-kernels=32", "--share-gpus", "--no-selftest"
        )
        procs.wait_server(self.user_url, self.user_tok)
        for name, cfgdir in (("stock", stock_cfg), ("nodelay", nodelay_cfg)):
            procs.wait_server(kg_urls[name], None, "/api")
            env = clean_env(JUPYTER_CONFIG_DIR=str(cfgdir))
            _, url, tok = procs.spawn_user_server(
                cluster, f"gateway-server-{name}", env, [f"--GatewayClient.url={kg_urls[name]}"]
            )
            self.gateways[name] = (url, tok)
        for url, tok in self.gateways.values():
            procs.wait_server(url, tok)
        log("all servers answer")

    # -- execute round trips --------------------------------------------------------------

    async def rtt(self) -> None:
        cfg = self.cfg
        os.environ["GPU_SHARE_BROKER_URL"] = self.cluster.url  # for the direct gpu-share client
        os.environ["GPU_SHARE_TOKEN"] = self.user_token
        targets: dict[str, Any] = {
            "local_server": ServerKernelClient(self.user_url, self.user_tok, "python3"),
            "remote": ServerKernelClient(self.user_url, self.user_tok, "gpu-share"),
            "local_floor": DirectKernelClient("python3"),
            "remote_floor": DirectKernelClient("gpu-share"),
            "relay_direct": RelayKernelClient(self.cluster.url, self.user_token),
            "gateway_stock": ServerKernelClient(*self.gateways["stock"], "python3"),
            "gateway_nodelay": ServerKernelClient(*self.gateways["nodelay"], "python3"),
        }
        self.kernels = targets
        log("starting kernels for the round trips")
        await asyncio.gather(*(k.start() for k in targets.values()))
        self.details["ws_protocol"] = {
            n: k.protocol for n, k in targets.items() if hasattr(k, "protocol")
        }
        for kernel in targets.values():
            for _ in range(cfg["rtt_warmup"]):
                await self._one(kernel)
        samples: dict[str, list[float]] = collections.defaultdict(list)
        names = list(targets)
        log(f"round trips: {cfg['rtt_rounds']} rounds x {len(names)} paths, interleaved")
        for i in range(cfg["rtt_rounds"]):
            for name in alternate(names, i):
                if name == "gateway_stock" and i >= cfg["rtt_rounds_stock_gateway"]:
                    continue
                samples[name].append(await self._one(targets[name]))
        ms = {n: [s * 1000 for s in v] for n, v in samples.items()}
        med = {n: median(v) for n, v in ms.items()}
        p99 = {n: percentile(v, 99) for n, v in ms.items()}
        self.details["rtt_ms"] = {
            n: {
                "median": rnd(med[n]),
                "p90": rnd(percentile(ms[n], 90)),
                "p99": rnd(p99[n]),
                "min": rnd(min(ms[n])),
                "n": len(ms[n]),
            }
            for n in ms
        }
        r = self.results
        r["execute_rtt_median_ratio"] = rnd(ratio(med["remote"], med["local_server"]))
        r["execute_rtt_p99_ratio"] = rnd(ratio(p99["remote"], p99["local_server"]))
        r["execute_rtt_added_ms"] = rnd(med["remote"] - med["local_server"])
        low, high = median_difference_interval(ms["remote"], ms["local_server"])
        self.details["execute_rtt_added_ms_ci95"] = [rnd(low), rnd(high)]
        self.details["execute_rtt_added_ms_paired"] = rnd(
            paired_median_difference(ms["remote"], ms["local_server"])
        )
        r["local_floor_rtt_ms"] = rnd(med["local_floor"])
        r["local_server_rtt_ms"] = rnd(med["local_server"])
        r["remote_rtt_ms"] = rnd(med["remote"])
        r["remote_floor_rtt_ms"] = rnd(med["remote_floor"])
        r["relay_direct_rtt_ms"] = rnd(med["relay_direct"])
        r["gateway_mode_rtt_median_ratio"] = rnd(ratio(med["gateway_stock"], med["local_server"]))
        r["gateway_mode_nodelay_rtt_median_ratio"] = rnd(
            ratio(med["gateway_nodelay"], med["local_server"])
        )
        r["gateway_mode_nodelay_added_ms"] = rnd(med["gateway_nodelay"] - med["local_server"])

    async def _one(self, kernel: Any) -> float:
        if isinstance(kernel, DirectKernelClient):
            return await kernel.execute(TRIVIAL)
        execution = await kernel.execute(TRIVIAL)
        if execution.reply is None or execution.reply.get("status") != "ok":
            raise RuntimeError(f"trivial cell failed: {execution.reply}")
        return execution.elapsed

    # -- CPU per execute, by process --------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        cluster = self.cluster
        pids = {
            "broker": cluster.broker.pid,
            "host_agent": self.host_proc.pid,
            "user_server": self.user_proc.pid,
        }
        kernel = procs.find_descendant(self.host_proc.pid, "ipykernel")
        if kernel is not None:
            pids["remote_kernel"] = kernel
        return pids

    def _path_pids(self, name: str) -> dict[str, int]:
        """The processes one execute goes through on a path, the bench client included."""
        if name == "remote":
            pids = self._pids()
        else:
            pids = {"user_server": self.user_proc.pid}
            kernel_pid = self._kernel_pid(self.user_proc.pid, self.kernels[name])
            if kernel_pid in set(procs.children(self.user_proc.pid)):
                pids["local_kernel"] = kernel_pid
        pids["bench_client"] = os.getpid()
        return pids

    async def cpu_breakdown(self) -> None:
        """CPU milliseconds each process spends per trivial execute, remote vs local, in
        alternating blocks of ten so a slow spell of the machine falls on both sides."""
        n, block = self.cfg["cpu_rounds"], 10
        names = ("remote", "local_server")
        pids = {name: self._path_pids(name) for name in names}
        cpu = {name: dict.fromkeys(pids[name], 0.0) for name in names}
        wall = dict.fromkeys(names, 0.0)
        for i in range(max(1, n // block)):
            for name in alternate(list(names), i):
                before = {k: procs.cpu_seconds(p) for k, p in pids[name].items()}
                started = time.perf_counter()
                for _ in range(block):
                    await self._one(self.kernels[name])
                wall[name] += time.perf_counter() - started
                for k, p in pids[name].items():
                    cpu[name][k] += procs.cpu_seconds(p) - before[k]
        count = max(1, n // block) * block
        out: dict[str, dict[str, float | None]] = {}
        for name in names:
            out[name] = {k: rnd(v * 1000 / count, 3) for k, v in cpu[name].items()}
            out[name]["wall_ms_per_execute"] = rnd(wall[name] * 1000 / count)
        self.details["cpu_ms_per_execute"] = out

    def _kernel_pid(self, server_pid: int, kernel: ServerKernelClient) -> int | None:
        import psutil

        for pid in procs.children(server_pid):
            try:
                if any(
                    kernel.kernel_id and kernel.kernel_id in part
                    for part in psutil.Process(pid).cmdline()
                ):
                    return pid
            except psutil.Error:
                pass
        return None

    # -- profile of the relay path --------------------------------------------------------

    async def profile(self) -> None:
        """py-spy the broker, host agent and user server while the remote kernel executes."""
        pyspy = pyspy_path()
        if pyspy is None:
            self.notes.append("py-spy not installed: no profile of the relay path")
            return
        seconds = self.cfg["profile_seconds"]
        pids = self._pids()
        pids.pop("remote_kernel", None)
        outdir = self.workdir / "profiles"
        outdir.mkdir(exist_ok=True)
        spies = {
            name: subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "500",
                    "--format",
                    "raw",
                    "--output",
                    str(outdir / f"{name}.txt"),
                    "--nonblocking",
                    "--threads",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        }
        await asyncio.sleep(1.0)  # py-spy attaches
        deadline = time.perf_counter() + seconds - 1.5
        count = 0
        while time.perf_counter() < deadline:
            await self._one(self.kernels["remote"])
            count += 1
        for spy in spies.values():
            await asyncio.get_running_loop().run_in_executor(None, spy.wait)
        summary = {}
        for name in spies:
            path = outdir / f"{name}.txt"
            if path.exists():
                summary[name] = summarise_profile(path.read_text())
        self.details["profile"] = {
            "executes": count,
            "seconds": seconds,
            "processes": summary,
            "raw_dir": str(outdir),
        }

    # -- throughput -----------------------------------------------------------------------

    async def throughput(self) -> None:
        """MB/s of stdout and of one large display, remote over local in the same round
        (the median of those paired ratios), with each process's CPU per transfer."""
        cfg = self.cfg
        kernels = {"local": self.kernels["local_server"], "remote": self.kernels["remote"]}
        pids = {"local": self._path_pids("local_server"), "remote": self._path_pids("remote")}
        chunks = cfg["stdout_mb"] * 10  # 100 KB each
        stdout_bytes = chunks * 100_000
        stdout_code = (
            "import sys\nchunk = 'x' * 100_000\n"
            f"for _ in range({chunks}):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()\n"
        )
        display_bytes = 20 * 2**20
        display_code = (
            "from IPython.display import display\n"
            f"display({{'text/plain': 'x' * {display_bytes}}}, raw=True)\n"
        )
        rates: dict[str, list[float]] = collections.defaultdict(list)
        cpu_ms: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
        log(
            f"throughput: {cfg['throughput_rounds']} rounds of {cfg['stdout_mb']} MB stdout "
            "and one 20 MiB display, interleaved"
        )
        for i in range(cfg["throughput_rounds"]):
            for kind, code, expected in (
                ("stdout", stdout_code, stdout_bytes),
                ("display", display_code, display_bytes),
            ):
                for name in alternate(["local", "remote"], i):
                    before = {k: procs.cpu_seconds(p) for k, p in pids[name].items()}
                    if kind == "stdout":
                        size, elapsed = await self._stream_bytes(kernels[name], code)
                    else:
                        size, elapsed = await self._display_bytes(kernels[name], code)
                    after = {k: procs.cpu_seconds(p) for k, p in pids[name].items()}
                    if size != expected:
                        raise RuntimeError(f"{name}: {kind} of {size} bytes, not {expected}")
                    rates[f"{kind}_{name}"].append(expected / elapsed / 1e6)
                    cpu_ms[f"{kind}_{name}"].append(
                        {k: (after[k] - before[k]) * 1000 for k in pids[name]}
                    )
        med = {k: median(v) for k, v in rates.items()}
        self.details["throughput_mb_s"] = {k: rnd(v, 1) for k, v in med.items()}
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        breakdown: dict[str, dict[str, float | None]] = {}
        for key, rounds in cpu_ms.items():
            by = {k: median([r[k] for r in rounds]) for k in rounds[0]}
            breakdown[key] = {k: rnd(v, 1) for k, v in by.items()}
            breakdown[key]["total"] = rnd(sum(by.values()), 1)
        self.details["cpu_ms_per_transfer"] = breakdown
        for kind in ("stdout", "display"):
            local, remote = rates[f"{kind}_local"], rates[f"{kind}_remote"]
            paired = [r / loc for r, loc in zip(remote, local, strict=True)]
            self.results[f"{kind}_throughput_ratio"] = rnd(median(paired))
            self.details[f"{kind}_throughput_ratios_by_round"] = [rnd(x) for x in paired]
            self.details[f"{kind}_throughput_ratio_of_medians"] = rnd(
                ratio(med[f"{kind}_remote"], med[f"{kind}_local"])
            )
            # The rate this machine's cores allow each path from CPU alone: its busiest
            # process, or all of its processes' CPU spread over every core.
            floors = {
                name: max(
                    max(v for k, v in breakdown[f"{kind}_{name}"].items() if k != "total"),
                    breakdown[f"{kind}_{name}"]["total"] / cores,
                )
                for name in ("local", "remote")
            }
            self.results[f"{kind}_throughput_ratio_cpu_bound"] = rnd(
                ratio(floors["local"], floors["remote"])
            )

    async def _stream_bytes(self, kernel: ServerKernelClient, code: str) -> tuple[int, float]:
        total = 0

        def on_output(kind: str, content: Any) -> None:
            nonlocal total
            if kind == "stream":
                total += len(content()["text"])

        execution = await kernel.execute(code, timeout=300, on_output=on_output)
        return total, execution.elapsed

    async def _display_bytes(
        self, kernel: ServerKernelClient, code: str, timeout: float = 300
    ) -> tuple[int, float]:
        size = -1

        def on_output(kind: str, content: Any) -> None:
            nonlocal size
            if kind == "display_data":
                size = len(content()["data"]["text/plain"])

        execution = await kernel.execute(code, timeout=timeout, on_output=on_output)
        return size, execution.elapsed

    async def big_message(self) -> None:
        """One 50 MB display message: whole through our path? (and through gateway mode)."""
        size = 50_000_000
        code = (
            "from IPython.display import display\n"
            f"display({{'text/plain': 'y' * {size}}}, raw=True)\n"
        )
        got = {}
        for name in ("remote", "local_server", "gateway_nodelay"):
            try:
                # Gateway mode drops the message and never reports idle: 30 s says enough.
                timeout = 30 if name.startswith("gateway") else 120
                received, elapsed = await self._display_bytes(self.kernels[name], code, timeout)
                got[name] = {"bytes": received, "seconds": rnd(elapsed)}
            except (asyncio.TimeoutError, RuntimeError) as error:
                got[name] = {"bytes": -1, "error": f"{type(error).__name__}: {error}"}
        self.details["single_50mb_message"] = got
        self.results["single_50mb_message_ok"] = got["remote"]["bytes"] == size
        self.results["gateway_single_50mb_message_ok"] = got["gateway_nodelay"]["bytes"] == size

    # -- first execute --------------------------------------------------------------------

    async def _first_execute(self, kernel_name: str) -> tuple[float, float]:
        client = ServerKernelClient(self.user_url, self.user_tok, kernel_name)
        started = time.perf_counter()
        kernel = await client.arest("POST", "/api/kernels", {"name": kernel_name})
        created = time.perf_counter() - started
        client.kernel_id = kernel["id"]
        await client.connect()
        execution = await client.execute(TRIVIAL, timeout=180)
        assert execution.reply_at is not None
        total = execution.reply_at - started
        await client.shutdown()
        return total, created

    async def first_execute(self) -> None:
        cfg = self.cfg
        times: dict[str, list[float]] = collections.defaultdict(list)
        log(f"first execute: {cfg['cold_rounds']} cold starts each, interleaved")
        for i in range(cfg["cold_rounds"]):
            for label, kernel_name in alternate(
                [("local", "python3"), ("remote_cold", "gpu-share")], i
            ):
                total, created = await self._first_execute(kernel_name)
                times[label].append(total)
                times[f"{label}_post"].append(created)
                await asyncio.sleep(0.5)
        warm_supported = await asyncio.get_running_loop().run_in_executor(None, warm_pool_option)
        if warm_supported:
            log("first execute from a warm pool")
            proc = self.cluster.start_host(
                "bench-warm",
                "1.8",
                "--max-kernels=8",
                "--warm-kernels=1",
                "--share-gpus",
                "--no-selftest",
            )
            await asyncio.sleep(cfg["warm_fill_seconds"])
            for i in range(cfg["cold_rounds"]):
                for label, kernel_name in alternate(
                    [("local", "python3"), ("remote_warm", "gpu-share")], i
                ):
                    total, created = await self._first_execute(kernel_name)
                    times[label].append(total)
                    times[f"{label}_post"].append(created)
                await asyncio.sleep(cfg["warm_fill_seconds"])
            sessions = self.cluster.client(self.user_token).request("GET", "/sessions")
            on_warm = sum(1 for s in sessions if s["host_id"] == "bench-warm")
            self.details["warm_sessions_on_warm_host"] = on_warm
            proc.stop()
        else:
            self.notes.append(
                "first_execute_warm_ratio is null: the host agent has no --warm-kernels option yet"
            )
        med = {k: median(v) for k, v in times.items()}
        self.details["first_execute_s"] = {k: rnd(v) for k, v in med.items()}
        self.results["first_execute_cold_ratio"] = rnd(ratio(med["remote_cold"], med["local"]))
        self.results["first_execute_warm_ratio"] = (
            rnd(ratio(med["remote_warm"], med["local"])) if "remote_warm" in med else None
        )

    # -- all of it ------------------------------------------------------------------------

    async def run_async(self) -> None:
        await self.rtt()
        log(f"rtt: {json.dumps(self.details['rtt_ms'])}")
        await self.cpu_breakdown()
        if self.results.get("execute_rtt_added_ms", 0) > 1.5 or self.cfg["always_profile"]:
            log("profiling the relay path with py-spy")
            await self.profile()
        await self.throughput()
        await self.big_message()
        for kernel in self.kernels.values():
            await kernel.shutdown()
        await self.first_execute()

    def run(self) -> None:
        try:
            self.start_processes()
            asyncio.run(self.run_async())
        except BaseException:
            if self.cluster is not None:
                log("e2e phase failed; process logs follow")
                print(self.cluster.logs()[-20000:], file=sys.stderr)
            raise
        finally:
            if self.cluster is not None:
                self.cluster.close()
