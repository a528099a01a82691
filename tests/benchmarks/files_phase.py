"""The notebook's folder to the host and back (issue 18), through one broker on loopback.

- ``sync_up_ratio``: a 100 MiB folder sent into a kernel's working folder (packed, the
  compressible half compressed, written on the host: ``files_put`` to ``files_done``) over
  a plain relay transfer of the same bytes (256 KiB binary messages to the host agent,
  which reads and drops them), interleaved in one run; >= 1 means the files went faster
  than raw bytes would (compression pays more than the packing costs).
- ``execute_rtt_during_sync_ratio``: a trivial execute's median round trip while 100 MiB
  the kernel wrote come back (``files_get``), over the same execute idle.

The folder: half CSV-like text (compresses about 3x), half random bytes (as weights or
images: sent as they are), in 40 files.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import Cluster

from .e2e_phase import log
from .stats import median, rnd

MIB = 1024 * 1024
PLAIN_ID = 2**31 - 1  # a transfer the host never began: it reads the chunks and drops them


def make_folder(root: Path, total: int, files: int = 40) -> int:
    """Half text, half noise; returns the bytes written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    each, written = total // files, 0
    for index in range(files):
        path = root / f"part-{index:02d}.{'csv' if index % 2 else 'bin'}"
        if index % 2:
            rows = []
            size = 0
            while size < each:
                row = f"{rng.randrange(10**6)},{rng.random():.6f},{rng.choice('abcdef') * 8}\n"
                rows.append(row)
                size += len(row)
            data = "".join(rows).encode()[:each]
        else:
            data = os.urandom(each)
        path.write_bytes(data)
        written += len(data)
    return written


class FilesPhase:
    def __init__(self, workdir: Path, cfg: dict[str, Any]):
        self.workdir = workdir / "files"
        self.workdir.mkdir()
        self.cfg = cfg
        self.results: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []

    def run(self) -> None:
        (self.workdir / "cluster").mkdir()
        cluster = Cluster(
            self.workdir / "cluster",
            heartbeat_interval=5.0,
            checkpoint_interval=5.0,
            **self.cfg.get("broker_traits", {}),
        )
        try:
            cluster.start_host("files-host")
            token = cluster.account("files-user", "user", 10_000 * 1_000_000)
            os.environ["GPU_SHARE_BROKER_URL"] = cluster.url
            os.environ["GPU_SHARE_TOKEN"] = token
            asyncio.run(self.measure())
        finally:
            cluster.close()

    async def measure(self) -> None:
        from jupyter_client.manager import AsyncKernelManager

        from jupyter_gpu_share.files import rules

        total = self.cfg.get("files_mib", 100) * MIB
        folder = self.workdir / "folder"
        size = make_folder(folder, total)
        entries, _ = rules.scan(str(folder), max_bytes=2 * total)
        empty = self.workdir / "empty"
        empty.mkdir()
        km = AsyncKernelManager(kernel_name="gpu-share")
        await km.start_kernel(cwd=str(empty))
        client = km.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=90)
            provisioner = km.provisioner
            run = provisioner._loop().run
            files = provisioner.bridge.files
            files.max_bytes = 2 * total
            plain_s, put_s = [], []
            for _ in range(self.cfg.get("files_rounds", 2)):
                started = time.perf_counter()
                await run(self._plain(provisioner.bridge, size))
                plain_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                await run(files.put(str(folder), entries))
                put_s.append(time.perf_counter() - started)
            self.results["sync_up_ratio"] = rnd(min(plain_s) / min(put_s), 2)
            self.details["sync_up"] = {
                "bytes": size,
                "plain_s": [rnd(s, 3) for s in plain_s],
                "files_s": [rnd(s, 3) for s in put_s],
                "files_mib_per_s": rnd(size / MIB / min(put_s), 1),
                "plain_mib_per_s": rnd(size / MIB / min(plain_s), 1),
            }
            log(f"files: up {self.details['sync_up']}")

            async def trivial() -> float:
                started = time.perf_counter()
                reply = await client.execute_interactive("x = 1", timeout=60)
                assert reply["content"]["status"] == "ok"
                return (time.perf_counter() - started) * 1000

            idle = [await trivial() for _ in range(100)]
            during: list[float] = []
            get_s = []
            for round_index in range(self.cfg.get("files_rounds", 2)):
                write = (
                    "import os\nos.makedirs('out', exist_ok=True)\n"
                    f"for i in range(40): open(f'out/{round_index}-{{i}}.bin', 'wb')"
                    f".write(os.urandom({total // 40}))"
                )
                reply = await client.execute_interactive(write, timeout=120)
                assert reply["content"]["status"] == "ok"
                getting = asyncio.ensure_future(run(files.get()))
                started = time.perf_counter()
                while not getting.done():
                    during.append(await trivial())
                summary = await getting
                get_s.append(time.perf_counter() - started)
                assert summary["bytes"] >= total * 0.9, summary
            idle += [await trivial() for _ in range(100)]
            self.results["execute_rtt_during_sync_ratio"] = rnd(median(during) / median(idle), 2)
            self.details["execute_during_sync"] = {
                "idle_ms": rnd(median(idle), 3),
                "during_ms": rnd(median(during), 3),
                "executes_during": len(during),
                "get_s": [rnd(s, 3) for s in get_s],
                "back_mib_per_s": rnd(total / MIB / min(get_s), 1),
            }
            log(f"files: back {self.details['execute_during_sync']}")
        finally:
            client.stop_channels()
            await km.shutdown_kernel(now=True)

    @staticmethod
    async def _plain(bridge: Any, size: int) -> None:
        """``size`` bytes in 256 KiB relay messages to the host, which drops them; the
        host's refusal of the end of a transfer it never began says all were read."""
        from jupyter_gpu_share import wire
        from jupyter_gpu_share.files.transfer import _HEAD, CHUNK

        files = bridge.files
        answer = asyncio.get_running_loop().create_future()
        files._waiting[PLAIN_ID] = answer
        block = os.urandom(CHUNK)
        head = _HEAD.pack(PLAIN_ID, 0)
        try:
            for _ in range(size // CHUNK):
                await bridge._write_files(wire.encode(wire.FILES, [head, block]))
            await bridge._send_files_record({"type": "files_end", "id": PLAIN_ID})
            try:
                await asyncio.wait_for(answer, 120)
            except Exception as error:  # the refusal: all chunks were read before it
                if "did not begin" not in str(error):
                    raise
        finally:
            files._waiting.pop(PLAIN_ID, None)


if __name__ == "__main__":
    import sys
    import tempfile

    phase = FilesPhase(Path(tempfile.mkdtemp(prefix="gpu-share-files-")), {})
    phase.run()
    print(json.dumps({**phase.results, "details": phase.details}, indent=2))
    sys.exit(0)
