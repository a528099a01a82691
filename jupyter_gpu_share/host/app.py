"""`jupyter gpu-share host`: run the host agent until signalled."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any, ClassVar

from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import Bool, Unicode

from .. import __version__
from ..heap import freeze_startup_objects
from .agent import NO_SANDBOX_WARNING, AgentAuthError, AgentConfigError, HostAgent
from .tokens import argv_warning

# Secrets that may be given on the command line: (trait, its file trait, option, file option,
# environment variable).
ARGV_SECRETS = (
    ("token", "token_file", "--token", "--token-file", "GPU_SHARE_TOKEN"),
    (
        "gateway_token",
        "gateway_token_file",
        "--gateway-token",
        "--gateway-token-file",
        "GPU_SHARE_GATEWAY_TOKEN",
    ),
)

aliases: dict[str, Any] = dict(base_aliases)
aliases.update(
    {
        "broker": "HostAgent.broker_url",
        "token": "HostAgent.token",
        "token-file": "HostAgent.token_file",
        "ca-file": "HostAgent.ca_file",
        "client-cert": "HostAgent.client_cert",
        "client-key": "HostAgent.client_key",
        "price-per-hour": "HostAgent.price_per_hour",
        "gpus": "HostAgentApp.gpu_list",
        "max-kernels": "HostAgent.max_kernels",
        "warm-kernels": "HostAgent.warm_kernels",
        "heartbeat-interval": "HostAgent.heartbeat_interval",
        "scratch-root": "HostAgent.scratch_root",
        "price-per-hour-by-model": "HostAgent.price_per_hour_by_model",
        "sandbox": "HostAgent.sandbox",
        "network": "HostAgent.network",
        "network-bandwidth-kbit": "HostAgent.network_bandwidth_kbit",
        "network-connections-per-minute": "HostAgent.network_connections_per_minute",
        "kernel-uids": "HostAgent.kernel_uids",
        "cpu-limit": "HostAgent.cpu_limit",
        "memory-limit-mib": "HostAgent.memory_limit_mib",
        "max-processes": "HostAgent.max_processes",
        "max-open-files": "HostAgent.max_open_files",
        "schedule": "HostAgent.schedule",
        "min-session-minutes": "HostAgent.min_session_minutes",
        "idle-command": "HostAgent.idle_command",
        "idle-stop-grace": "HostAgent.idle_stop_grace",
        "gateway-url": "HostAgent.gateway_url",
        "gateway-token": "HostAgent.gateway_token",
        "gateway-token-file": "HostAgent.gateway_token_file",
        "gateway-kernel-name": "HostAgent.gateway_kernel_name",
        "selftest-interval": "HostAgent.selftest_interval",
    }
)
flags: dict[str, Any] = dict(base_flags)
flags.update(
    {
        "no-sandbox": (
            {"HostAgent": {"sandbox": "none"}},
            "Run kernels WITHOUT a sandbox (renters' code runs as this user). Trusted only.",
        ),
        "share-gpus": (
            {"HostAgent": {"share_gpus": True}},
            "Let several renters share each GPU (up to --max-kernels); memory is not partitioned.",
        ),
        "self-test": (
            {"HostAgentApp": {"self_test": True}},
            "Measure the GPUs (or the CPU) to offer, print a table and exit.",
        ),
        "no-selftest": (
            {"HostAgent": {"selftest": False}},
            "Do not measure the GPUs at start and periodically (no benchmark in offers).",
        ),
    }
)


class HostAgentApp(JupyterApp):
    """Offer this machine's GPUs on a jupyter-gpu-share broker."""

    name = "jupyter-gpu-share-host"
    description = (
        "Connect this machine to a jupyter-gpu-share broker (outbound only), offer its GPUs "
        "(or its CPU when there is none) and run renters' kernels on them."
    )
    version = __version__
    examples = """
        umask 077; echo "$HOST_TOKEN" > ~/.gpu-share-token
        jupyter gpu-share host --broker https://broker.example:8888 --token-file ~/.gpu-share-token
        GPU_SHARE_TOKEN=... jupyter gpu-share host --broker https://broker.example:8888
    """
    aliases: ClassVar[dict[str, Any]] = aliases
    flags: ClassVar[dict[str, Any]] = flags
    classes: ClassVar[list[type]] = [HostAgent]

    gpu_list = Unicode(
        "", help="GPU indices to offer as a comma list, e.g. 0,1 (default: all)."
    ).tag(config=True)

    self_test = Bool(
        False, help="Run the GPU self-test (or the CPU one), print a table and exit."
    ).tag(config=True)

    def initialize(self, argv: list[str] | None = None) -> None:
        """Parse the command line and config files, then build the agent."""
        super().initialize(argv)
        if self.gpu_list.strip():
            try:
                indices = [int(part) for part in self.gpu_list.split(",") if part.strip()]
            except ValueError:
                self._fail(f"--gpus takes a comma list of GPU indices, not {self.gpu_list!r}")
            self.config.HostAgent.gpus = indices
        self.agent = HostAgent(parent=self, log=self.log)
        self._check_argv_secrets()

    def _check_argv_secrets(self) -> None:
        """Warn about a token given on the command line; refuse it together with its file."""
        given = self.cli_config.get("HostAgent", {})
        for trait, file_trait, option, file_option, env in ARGV_SECRETS:
            if trait not in given:
                continue
            if file_trait in given:
                self._fail(f"give {file_option} or {option}, not both")
            self.log.warning(argv_warning(option, file_option, env))

    def _fail(self, message: str, code: int = 2) -> None:
        print(f"{self.name}: error: {message}", file=sys.stderr, flush=True)
        self.exit(code)

    def _connected(self, agent: HostAgent) -> None:
        assert agent.inventory is not None
        print(
            f"host agent connected to {agent.active_broker_url} as {agent.host_id} offering: "
            f"{agent.inventory.summary()} at {agent.price_label}",
            flush=True,
        )

    def start(self) -> None:
        """Run the agent's event loop until SIGINT or SIGTERM."""
        if self.subapp is not None:
            return self.subapp.start()
        agent = self.agent
        if self.self_test:
            self._self_test(agent)
            self.exit(0)
        try:
            agent.check_config()
        except AgentConfigError as err:
            self._fail(str(err))
        if agent.sandbox == "none":
            print(NO_SANDBOX_WARNING, flush=True)
        agent.on_connected = self._connected
        try:
            asyncio.run(self._run(agent))
        except AgentAuthError as err:
            self._fail(str(err), code=1)
        except AgentConfigError as err:
            self._fail(str(err))

    def _self_test(self, agent: HostAgent) -> None:
        """Measure the GPUs this host would offer (the CPU when none) and print a table."""
        from .inventory import Inventory
        from .selftest import apply_flags, format_table, run_selftest

        inventory = Inventory(agent.gpus or None, agent.nvml_module)
        try:
            gpus = {gpu.index: gpu for gpu in inventory.gpus}
        finally:
            inventory.close()
        what = ", ".join(f"GPU {i} ({gpu.model})" for i, gpu in gpus.items()) or "the CPU"
        print(f"measuring {what} ...", flush=True)
        results = run_selftest(list(gpus))
        for result in results:
            gpu = gpus.get(result.get("index"))  # type: ignore[arg-type]
            if gpu is not None:
                apply_flags(result, gpu.model, gpu.memory_mib)
        print(format_table(results), flush=True)

    async def _run(self, agent: HostAgent) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, agent.request_stop)
        freeze_startup_objects()
        try:
            await agent.run()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)


main = launch_new_instance = HostAgentApp.launch_instance

if __name__ == "__main__":
    main()
