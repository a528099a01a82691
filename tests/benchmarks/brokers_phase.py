"""Several brokers on one PostgreSQL (issue 17): relay scaling, the cross-broker execute,
and the failover of a running kernel.

- ``brokers_relay_scaling``: relayed messages per second with two brokers over one, the
  same two load processes (echo kernels, ``loadgen relay``) measuring the same window;
  on two brokers each process's hosts and renters are on its own broker.
- ``cross_broker_execute_added_ms``: a trivial execute on a kernel whose session was
  started through the other broker (its relay goes to the host's broker, which the session
  names), over one started on the host's broker: paired rounds, the median difference.
- ``failover_resume_s``: ``kill -9`` of the host's broker to the reply of an execute sent
  at once (the host agent and the bridge move to the other broker).

PostgreSQL: $GPU_SHARE_TEST_DB_URL's server, else a throwaway one (``tests/pg.py``).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import Cluster
from tests.pg import fresh_database, postgres_server

from .e2e_phase import alternate, log
from .kernelws import DirectKernelClient
from .stats import median, median_difference_interval, paired_median_difference, rnd

TRIVIAL = "x = 1"


class BrokersPhase:
    def __init__(self, workdir: Path, cfg: dict[str, Any]):
        self.workdir = workdir / "brokers"
        self.workdir.mkdir()
        self.cfg = cfg
        self.results: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []

    def run(self) -> None:
        with postgres_server() as server:
            self.scaling(server)
            self.kernels(server)

    def _cluster(self, name: str, db_url: str, **traits: Any) -> Cluster:
        folder = self.workdir / name
        folder.mkdir(parents=True)
        return Cluster(folder, db_url=db_url, **self.cfg.get("broker_traits", {}), **traits)

    # -- relay scaling ----------------------------------------------------------------

    def scaling(self, server: str) -> None:
        from .run import loadgen_many

        kernels, window = self.cfg["brokers_kernels"], self.cfg["brokers_window_s"]
        rates: dict[int, int] = {}
        cpu_us: dict[int, float] = {}
        for count in (1, 2):
            log(f"brokers: {kernels} echo kernels in each of 2 load processes, {count} broker(s)")
            with fresh_database(server) as db_url:
                clusters = [
                    self._cluster(
                        f"scaling-{count}-{i}",
                        db_url,
                        minimum_start_seconds=0,
                        heartbeat_interval=5.0,
                        checkpoint_interval=5.0,
                    )
                    for i in range(count)
                ]
                barrier = self.workdir / f"barrier-{count}"
                arg_lists = []
                for index in range(2):
                    cluster = clusters[index % count]
                    arg_lists.append(
                        [
                            "--broker", cluster.url,
                            "--broker-pid", str(cluster.broker.pid),
                            "--admin-token", cluster.admin_token,
                            "--levels", str(kernels),
                            "--kernels-per-host", str(kernels),
                            "--prefix", f"p{index}",
                            "--gpu-model", f"BENCH-{index}",
                            "--barrier", str(barrier),
                            "--procs", "2",
                            "--index", str(index),
                            "--window", str(window),
                        ]
                    )  # fmt: skip
                try:
                    answers = loadgen_many("relay", arg_lists, timeout=600)
                finally:
                    for cluster in clusters:
                        cluster.close()
            rates[count] = sum(a["window"]["messages_per_s"] for a in answers)
            # Each process reads its own broker's CPU: with one broker, both read the same.
            cpu = sum(a["window"]["broker_cpu_s"] for a in answers[:count])
            cpu_us[count] = cpu * 1e6 / sum(a["window"]["relayed_messages"] for a in answers)
            self.details[f"brokers_relay_{count}"] = [a["window"] for a in answers]
        self.results["brokers_relay_messages_per_s_1"] = rates[1]
        self.results["brokers_relay_messages_per_s_2"] = rates[2]
        self.results["brokers_relay_scaling"] = rnd(rates[2] / rates[1], 2)
        # Broker CPU per relayed message, two brokers over one: 1.0 is no cost of having
        # several (the relay path touches no shared part), so N brokers on N free cores
        # relay N times as much.
        self.results["brokers_relay_cpu_per_message_ratio"] = rnd(cpu_us[2] / cpu_us[1], 2)
        self.notes.append(
            f"brokers_relay_scaling: {os.cpu_count()} cores for the brokers, the load "
            "processes and PostgreSQL together; each broker relays on one core, so the "
            "scaling is bounded by the cores left to the brokers"
        )

    # -- a kernel across brokers -------------------------------------------------------

    def kernels(self, server: str) -> None:
        with fresh_database(server) as db_url:
            one = self._cluster("one", db_url)
            two = self._cluster("two", db_url)
            try:
                both = f"{one.url},{two.url}"
                one.start_host("bench-host", "3.6", "--max-kernels=4", broker_url=both)
                token = one.account("bench-user", "user", 10**12)
                asyncio.run(self._kernels(one, two, token))
            finally:
                two.close()
                one.close()

    async def _kernels(self, one: Cluster, two: Cluster, token: str) -> None:
        os.environ["GPU_SHARE_TOKEN"] = token
        same, across = DirectKernelClient("gpu-share"), DirectKernelClient("gpu-share")
        os.environ["GPU_SHARE_BROKER_URL"] = one.url
        await same.start()
        os.environ["GPU_SHARE_BROKER_URL"] = two.url  # its relay: at one, the host's broker
        await across.start()
        try:
            for _ in range(self.cfg["rtt_warmup"]):
                await same.execute(TRIVIAL)
                await across.execute(TRIVIAL)
            times: dict[str, list[float]] = {"same": [], "across": []}
            rounds = self.cfg["brokers_rtt_rounds"]
            log(f"brokers: {rounds} paired executes, same broker and across brokers")
            for index in range(rounds):
                for name, client in alternate([("same", same), ("across", across)], index):
                    times[name].append(await client.execute(TRIVIAL))
            added = paired_median_difference(times["across"], times["same"])
            low, high = median_difference_interval(times["across"], times["same"])
            self.results["cross_broker_execute_added_ms"] = rnd(added * 1000)
            self.details["cross_broker"] = {
                "same_broker_median_ms": rnd(median(times["same"]) * 1000),
                "across_brokers_median_ms": rnd(median(times["across"]) * 1000),
                "added_interval_ms": [rnd(low * 1000), rnd(high * 1000)],
            }
            log("brokers: kill -9 of the host's broker, then an execute at once")
            killed = time.perf_counter()
            one.broker.kill()
            await across.execute(TRIVIAL, timeout=120)
            self.results["failover_resume_s"] = rnd(time.perf_counter() - killed, 2)
        finally:
            for client in (across, same):
                try:
                    await asyncio.wait_for(client.shutdown(), 30)
                except Exception as error:  # the killed broker's kernel stops with its host
                    log(f"brokers: a kernel did not stop cleanly: {error}")
