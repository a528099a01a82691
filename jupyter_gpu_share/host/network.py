"""Each kernel's own network: what it may reach, decided here as plain data.

A sandboxed kernel never shares the host's network namespace. The host picks one of:

- ``none``: a namespace with only its own loopback; the kernel reaches nothing;
- ``public`` (the default): the public internet through pasta (package ``passt``), a
  user-mode TCP/UDP stack whose connections the host's kernel makes on the kernel's
  behalf. Inside the namespace the routing table refuses (``prohibit``) the host's loopback,
  link-local (cloud metadata at 169.254.169.254), every private and shared range (RFC 1918,
  CGNAT 100.64/10, benchmarking, multicast, reserved) and every address and subnet of the
  host's own interfaces (its LAN, whatever range it is); an nftables table in the same
  namespace refuses the same a second time and limits bandwidth and new connections;
- an allow-list (``pypi.org,files.pythonhosted.org,192.0.2.0/24``): only those addresses
  (names are resolved when the agent starts), plus DNS.

IPv6 is off inside the namespace: pasta runs with ``-4``, so ULA and link-local IPv6 (and
the host's IPv6 LAN) cannot be reached either.

The namespace, pasta and the rules belong to the kernel's user namespace, never to the
renter: the kernel itself runs in a nested user namespace with every capability dropped, so
it cannot change a route or a rule (``netguard`` applies them before it starts the sandbox).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

IPv4Network = ipaddress.IPv4Network

# Never reachable from a kernel, whatever the host allows by default (IANA special-purpose
# registry, IPv4): "this network", private, shared (CGNAT), loopback, link-local, IETF
# protocol assignments, benchmarking, multicast, reserved, broadcast.
BLOCKED_RANGES = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)

# Documentation ranges (RFC 5737): never routed on the internet, so an address of the
# namespace's own subnet that leaks out through pasta reaches nobody.
INNER_SUBNETS = ("198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24")
INNER_IFNAME = "eth0"
MODES = ("none", "public", "allowlist")
MAX_ALLOWLIST = 64


class NetworkConfigError(ValueError):
    """A network setting the agent cannot use."""


@dataclass(frozen=True)
class NetworkPolicy:
    """What a kernel's network may reach, and how fast."""

    mode: str = "public"
    allow: tuple[IPv4Network, ...] = ()
    allow_names: tuple[str, ...] = ()  # as the host wrote them, for people
    bandwidth_kbit: int = 0  # each direction; 0: no limit
    connections_per_minute: int = 0  # new outbound connections; 0: no limit

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise NetworkConfigError(f"network mode must be one of {MODES}, not {self.mode!r}")
        if self.bandwidth_kbit < 0 or self.connections_per_minute < 0:
            raise NetworkConfigError("network limits must not be negative")

    @property
    def needs_stack(self) -> bool:
        """Tell whether the kernel needs pasta (any network beyond its own loopback)."""
        return self.mode != "none"

    def describe(self) -> str:
        """Say in a few words what the kernel can reach."""
        if self.mode == "none":
            text = "no network"
        elif self.mode == "public":
            text = "public internet only (IPv4; never this host, its LAN or private ranges)"
        else:
            text = "only " + ", ".join(self.allow_names or [str(n) for n in self.allow])
        limits = []
        if self.needs_stack and self.bandwidth_kbit:
            limits.append(f"{self.bandwidth_kbit} kbit/s each way")
        if self.needs_stack and self.connections_per_minute:
            limits.append(f"{self.connections_per_minute} new connections a minute")
        return text + (f", {', '.join(limits)}" if limits else "")


def _resolve(name: str) -> list[IPv4Network]:
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as err:
        raise NetworkConfigError(f"network allow-list: cannot resolve {name!r} ({err})") from None
    return sorted({IPv4Network(info[4][0]) for info in infos})


def parse_network(
    text: str, *, bandwidth_kbit: int = 0, connections_per_minute: int = 0
) -> NetworkPolicy:
    """Parse ``none``, ``public`` or a comma-separated allow-list of addresses, networks and
    host names (resolved now, IPv4)."""
    text = text.strip()
    limits = {"bandwidth_kbit": bandwidth_kbit, "connections_per_minute": connections_per_minute}
    if text in ("none", "public"):
        return NetworkPolicy(text, **limits)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise NetworkConfigError("network: use 'none', 'public' or a comma-separated allow-list")
    if len(items) > MAX_ALLOWLIST:
        raise NetworkConfigError(f"network allow-list: at most {MAX_ALLOWLIST} entries")
    allow: list[IPv4Network] = []
    for item in items:
        try:
            allow.append(IPv4Network(item, strict=False))
            continue
        except ValueError:
            pass
        if ":" in item:
            raise NetworkConfigError(f"network allow-list: IPv6 is not offered ({item!r})")
        if not all(c.isalnum() or c in "-." for c in item) or len(item) > 253:
            raise NetworkConfigError(f"network allow-list: {item!r} is not an address or name")
        allow += _resolve(item)
    return NetworkPolicy("allowlist", tuple(allow), tuple(items), **limits)


@dataclass(frozen=True)
class HostNetworks:
    """The host's own IPv4 addresses and the subnets its interfaces reach directly."""

    addresses: tuple[IPv4Network, ...] = ()
    subnets: tuple[IPv4Network, ...] = ()

    def all(self) -> list[IPv4Network]:
        """Every network of the host, addresses first."""
        return [*self.addresses, *self.subnets]


def read_host_networks(ip: str | None = None) -> HostNetworks:
    """Read the host's addresses and directly reachable subnets with ``ip -j``."""
    ip = ip or shutil.which("ip") or "ip"
    addresses: set[IPv4Network] = set()
    subnets: set[IPv4Network] = set()
    try:
        raw = subprocess.run(
            [ip, "-j", "-4", "addr", "show"], capture_output=True, check=True, timeout=10
        ).stdout
        for link in json.loads(raw or b"[]"):
            for entry in link.get("addr_info", []):
                local = entry.get("local")
                if local:
                    addresses.add(IPv4Network(local))
                    subnets.add(IPv4Network(f"{local}/{entry.get('prefixlen', 32)}", strict=False))
        raw = subprocess.run(
            [ip, "-j", "-4", "route", "show", "table", "all"],
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout
        for route in json.loads(raw or b"[]"):
            dst = route.get("dst", "")
            if dst and dst != "default" and route.get("type", "unicast") == "unicast":
                subnets.add(IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
            gateway = route.get("gateway")
            if gateway:  # the router: its admin page is not for renters
                addresses.add(IPv4Network(gateway))
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise NetworkConfigError(f"cannot read this host's networks with ip ({err})") from None
    return HostNetworks(tuple(sorted(addresses)), tuple(sorted(subnets)))


def inner_subnet(host: HostNetworks) -> IPv4Network:
    """Pick the kernel namespace's own subnet: a documentation range the host does not use."""
    for text in INNER_SUBNETS:
        candidate = IPv4Network(text)
        if not any(candidate.overlaps(net) for net in host.all()):
            return candidate
    raise NetworkConfigError(
        "this host uses every documentation range (198.51.100.0/24, 203.0.113.0/24, "
        "192.0.2.0/24) itself; a kernel network needs one of them free"
    )


@dataclass(frozen=True)
class GuardSpec:
    """What ``netguard`` sets up inside a kernel's namespace before the sandbox starts."""

    mode: str
    subnet: str
    gateway: str
    address: str
    blocked: tuple[str, ...]
    allow: tuple[str, ...] = ()
    bandwidth_kbit: int = 0
    connections_per_minute: int = 0
    rlimits: tuple[tuple[int, int], ...] = field(default=())

    def to_json(self) -> str:
        """Serialise for netguard's command line."""
        return json.dumps(
            {
                "mode": self.mode,
                "subnet": self.subnet,
                "gateway": self.gateway,
                "address": self.address,
                "blocked": list(self.blocked),
                "allow": list(self.allow),
                "bandwidth_kbit": self.bandwidth_kbit,
                "connections_per_minute": self.connections_per_minute,
                "rlimits": [list(pair) for pair in self.rlimits],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> GuardSpec:
        """Read what :meth:`to_json` wrote."""
        data = json.loads(text)
        return cls(
            mode=str(data["mode"]),
            subnet=str(data["subnet"]),
            gateway=str(data["gateway"]),
            address=str(data["address"]),
            blocked=tuple(str(b) for b in data["blocked"]),
            allow=tuple(str(a) for a in data.get("allow", ())),
            bandwidth_kbit=int(data.get("bandwidth_kbit", 0)),
            connections_per_minute=int(data.get("connections_per_minute", 0)),
            rlimits=tuple((int(a), int(b)) for a, b in data.get("rlimits", ())),
        )


def blocked_networks(host: HostNetworks, extra: Iterable[str] = ()) -> list[IPv4Network]:
    """Every network a kernel must never reach: the fixed ranges and the host's own."""
    nets = {IPv4Network(text) for text in BLOCKED_RANGES}
    nets.update(host.all())
    nets.update(IPv4Network(text, strict=False) for text in extra)
    return sorted(ipaddress.collapse_addresses(nets))


def guard_spec(
    policy: NetworkPolicy, host: HostNetworks, rlimits: Sequence[tuple[int, int]] = ()
) -> GuardSpec:
    """Decide the namespace's addresses, routes and rules for ``policy`` on this host."""
    subnet = inner_subnet(host)
    hosts = list(subnet.hosts())
    return GuardSpec(
        mode=policy.mode,
        subnet=str(subnet),
        gateway=str(hosts[0]),
        address=str(hosts[1]),
        blocked=tuple(str(n) for n in blocked_networks(host)),
        allow=tuple(str(n) for n in policy.allow),
        bandwidth_kbit=policy.bandwidth_kbit,
        connections_per_minute=policy.connections_per_minute,
        rlimits=tuple(rlimits),
    )


def route_batch(spec: GuardSpec) -> str:
    """The ``ip -batch`` lines that make the namespace's routing table refuse what is
    blocked (and, for an allow-list, everything but the list)."""
    lines = [f"route replace prohibit {net}" for net in spec.blocked]
    if spec.mode == "allowlist":
        lines.append("route del default")
        lines += [
            f"route replace {net} via {spec.gateway} dev {INNER_IFNAME}" for net in spec.allow
        ]
    return "\n".join(lines) + "\n"


def _nft_set(nets: Iterable[str]) -> str:
    return ", ".join(nets)


def nft_ruleset(spec: GuardSpec) -> str:
    """The nftables table for the namespace: the same refusals as the routes (a second
    layer), DNS only to the namespace's resolver, and the bandwidth and connection limits."""
    rate = ""
    if spec.bandwidth_kbit:
        kbytes = max(1, spec.bandwidth_kbit // 8)
        rate = f"limit rate over {kbytes} kbytes/second burst {max(64, kbytes // 4)} kbytes drop"
    out = [
        'oifname "lo" accept',
        "meta nfproto ipv6 drop",
        f"ip daddr {spec.gateway} udp dport 53 accept",
        f"ip daddr {spec.gateway} tcp dport 53 accept",
        f"ip daddr {spec.subnet} reject with icmp type admin-prohibited",
        "ip daddr @blocked reject with icmp type admin-prohibited",
    ]
    if spec.mode == "allowlist":
        out.append("ip daddr != @allowed reject with icmp type admin-prohibited")
    if spec.connections_per_minute:
        burst = max(5, spec.connections_per_minute // 6)
        out.append(
            f"ct state new limit rate over {spec.connections_per_minute}/minute "
            f"burst {burst} packets reject with icmp type admin-prohibited"
        )
    if rate:
        out.append(rate)
    inp = ['iifname "lo" accept', "meta nfproto ipv6 drop"]
    if rate:
        inp.append(rate)
    sets = [
        "  set blocked { type ipv4_addr; flags interval; auto-merge; "
        f"elements = {{ {_nft_set(spec.blocked)} }} }}"
    ]
    if spec.mode == "allowlist":
        sets.append(
            "  set allowed { type ipv4_addr; flags interval; auto-merge; "
            f"elements = {{ {_nft_set(spec.allow)} }} }}"
        )
    body = "\n".join(
        [
            "table inet gpu_share {",
            *sets,
            "  chain output { type filter hook output priority 0; policy accept;",
            *[f"    {rule}" for rule in out],
            "  }",
            "  chain input { type filter hook input priority 0; policy accept;",
            *[f"    {rule}" for rule in inp],
            "  }",
            "}",
        ]
    )
    return body + "\n"


def pasta_argv(pasta: str, spec: GuardSpec, log_file: str) -> list[str]:
    """pasta's command line for a kernel namespace: IPv4 only, our own addresses, no port
    forwarded either way, the gateway never mapped to the host's loopback, DNS forwarded to
    the host's resolver from the gateway address."""
    prefix = IPv4Network(spec.subnet).prefixlen
    return [
        pasta,
        "--quiet",
        "--log-file",
        log_file,
        "--config-net",
        "-4",
        "--ns-ifname",
        INNER_IFNAME,
        "--address",
        spec.address,
        "--netmask",
        str(prefix),
        "--gateway",
        spec.gateway,
        "--no-map-gw",
        "--dns-forward",
        spec.gateway,
        "--tcp-ports",
        "none",
        "--udp-ports",
        "none",
        "--tcp-ns",
        "none",
        "--udp-ns",
        "none",
        "--",
    ]


def missing_tools(policy: NetworkPolicy) -> list[str]:
    """The programs this policy needs that are not on PATH, as Debian package hints."""
    if not policy.needs_stack:
        return []
    need = {"pasta": "passt", "ip": "iproute2", "nft": "nftables"}
    return [
        f"{tool} (apt-get install {pkg})" for tool, pkg in need.items() if not shutil.which(tool)
    ]
