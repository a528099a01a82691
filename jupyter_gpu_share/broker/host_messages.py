"""A host's control messages, checked field by field before the broker keeps any of it.

Every byte from a host is hostile input (docs/DESIGN "Trust and safety"): what a host says
in its ``hello`` and ``heartbeat`` is stored in memory and served to every renter in
``GET /offers``. So each message is parsed under a size cap (:func:`parse_control`), and
each field is checked against a whitelist: integers in range (never a bool), finite
numbers, short strings of printable UTF-8, bounded lists, bounded nesting. Unknown keys are
dropped, so the broker keeps only what it understands; a known key with a wrong value is
refused with a :class:`HostMessageError` that names the field (never echoes the value).

The functions return new, clean dicts: nothing of the host's own objects is kept.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable
from typing import Any

HELLO_MAX_BYTES = 256 * 1024
HEARTBEAT_MAX_BYTES = 64 * 1024
MAX_DEPTH = 8  # hello -> offers -> [i] -> sandbox -> limits is 4 levels deep
MAX_GPUS = 64
MAX_OFFERS = 64
MAX_SESSIONS = 1024
MAX_GPU_INDEX = 1023
MAX_MIB = 1 << 30  # 1 PiB, in MiB
MAX_PRICE_PER_SECOND_MICRO = 10**9  # 3.6 million credits an hour: far above any real price
MAX_SANDBOX_ITEMS = 16
SHORT = 128  # names: models, versions, uuids, session ids
TEXT = 1024  # sentences: reasons, errors, a schedule

SANDBOX_KINDS = ("bwrap", "none")
SANDBOX_NETWORKS = ("none", "public", "allowlist", "host")
SANDBOX_UIDS = ("dedicated", "agent")


class HostMessageError(ValueError):
    """A host control message that breaks the rules; the text names the field and the rule."""


# -- the message as a whole ------------------------------------------------------------------


def parse_control(message: str | bytes | bytearray, max_bytes: int) -> dict[str, Any]:
    """Parse one control message: a JSON object of at most ``max_bytes`` bytes with a 'type'."""
    size = len(message) if not isinstance(message, str) else _utf8_length(message)
    if size > max_bytes:
        raise HostMessageError(f"control message of {size} bytes is over the {max_bytes} limit")
    if not isinstance(message, str):
        try:
            message = bytes(message).decode("utf-8")
        except UnicodeDecodeError:
            raise HostMessageError("control message is not valid UTF-8") from None
    try:
        # NaN and Infinity are not JSON, but Python reads them as floats: the field checks
        # refuse them where they count, so a heartbeat with one is dropped, not the host.
        data = json.loads(message)
    except RecursionError:
        raise HostMessageError(f"control message nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError; an integer of more than 4300 digits
        raise HostMessageError(f"control message is not JSON: {str(err)[:120]}") from None
    if not isinstance(data, dict):
        raise HostMessageError("control message is not a JSON object")
    check_depth(data)
    kind = data.get("type")
    if not isinstance(kind, str) or not 0 < len(kind) <= 32:
        raise HostMessageError("control message has no 'type' (a short string)")
    return data


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Refuse containers nested deeper than ``max_depth`` (the top level is depth 1)."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 1
    while level:
        inner: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            inner.extend(child for child in children if isinstance(child, (dict, list)))
        if inner and depth >= max_depth:
            raise HostMessageError(f"control message nested deeper than {max_depth} levels")
        level, depth = inner, depth + 1


def message_kind(data: Any) -> str:
    """The 'type' of a message, fit to print (at most 32 characters)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if isinstance(kind, str) and 0 < len(kind) <= 32 and kind.isprintable():
        return kind
    return "control"


# -- fields ----------------------------------------------------------------------------------

_MISSING = object()


def integer(value: Any, field: str, low: int, high: int) -> int:
    """An integer from ``low`` to ``high`` (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise HostMessageError(f"{field} must be an integer")
    if not low <= value <= high:
        raise HostMessageError(f"{field} must be from {low} to {high}")
    return int(value)


def number(value: Any, field: str, low: float, high: float) -> float | int:
    """A finite number from ``low`` to ``high`` (a bool, NaN or infinity is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HostMessageError(f"{field} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise HostMessageError(f"{field} must be a finite number")
    if not low <= value <= high:
        raise HostMessageError(f"{field} must be from {low:g} to {high:g}")
    return value


def text(value: Any, field: str, max_length: int = SHORT) -> str:
    """A string of at most ``max_length`` printable characters that encodes as UTF-8."""
    if not isinstance(value, str):
        raise HostMessageError(f"{field} must be a string")
    if len(value) > max_length:
        raise HostMessageError(f"{field} must be at most {max_length} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a \\ud800 escape
        raise HostMessageError(f"{field} is not valid UTF-8") from None
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        # Terminal escapes, NUL, newlines, right-to-left overrides: a name is shown as it is.
        raise HostMessageError(f"{field} must not hold control characters")
    return value


def choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise HostMessageError(f"{field} must be one of {', '.join(allowed)}")
    return value


def boolean(value: Any, field: str) -> bool:
    """True or false."""
    if not isinstance(value, bool):
        raise HostMessageError(f"{field} must be true or false")
    return value


def items(value: Any, field: str, max_items: int) -> list[Any]:
    """A list of at most ``max_items``."""
    if not isinstance(value, list):
        raise HostMessageError(f"{field} must be a list")
    if len(value) > max_items:
        raise HostMessageError(f"{field} must have at most {max_items} items")
    return value


def mapping(value: Any, field: str) -> dict[str, Any]:
    """A JSON object."""
    if not isinstance(value, dict):
        raise HostMessageError(f"{field} must be an object")
    return value


Check = Callable[[Any, str], Any]


def nullable(check: Check) -> Check:
    """``check``, or None."""

    def checked(value: Any, field: str) -> Any:
        return None if value is None else check(value, field)

    return checked


def _int(low: int, high: int) -> Check:
    return lambda value, field: integer(value, field, low, high)


def _num(low: float, high: float) -> Check:
    return lambda value, field: number(value, field, low, high)


def _text(max_length: int = SHORT) -> Check:
    return lambda value, field: text(value, field, max_length)


def _choice(*allowed: str) -> Check:
    return lambda value, field: choice(value, field, allowed)


def _fields(
    value: Any,
    field: str,
    schema: dict[str, Check],
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The known keys of an object, each checked; unknown keys dropped."""
    source = mapping(value, field)
    out: dict[str, Any] = {}
    for name, check in schema.items():
        raw = source.get(name, _MISSING)
        if raw is _MISSING:
            if name in required:
                raise HostMessageError(f"{field}.{name} is required")
            continue
        out[name] = check(raw, f"{field}.{name}")
    return out


# -- hello -----------------------------------------------------------------------------------

_GPU = {
    "index": _int(0, MAX_GPU_INDEX),
    "model": _text(),
    "memory_mib": _int(0, MAX_MIB),
    "uuid": _text(),
}

_SANDBOX_LIMITS = {
    "memory_mib": nullable(_int(0, MAX_MIB)),
    "max_processes": nullable(_int(0, 1 << 22)),  # Linux's largest pid_max
    "cpu": nullable(_num(0, 65_536)),
    "scratch_mib": nullable(_int(0, MAX_MIB)),
    "bandwidth_kbit": nullable(_int(0, 1 << 32)),
    "connections_per_minute": nullable(_int(0, 1 << 24)),
}


def _names(value: Any, field: str) -> list[str]:
    return [
        text(v, f"{field}[{i}]", 64) for i, v in enumerate(items(value, field, MAX_SANDBOX_ITEMS))
    ]


_SANDBOX = {
    "kind": _choice(*SANDBOX_KINDS),
    "network": _choice(*SANDBOX_NETWORKS),
    "uid": _choice(*SANDBOX_UIDS),
    "limits": lambda value, field: _fields(value, field, _SANDBOX_LIMITS),
    "enforced": _names,
    "unenforced": _names,
}


def validate_sandbox(value: Any, field: str = "sandbox") -> dict[str, Any]:
    """How a host isolates renters' kernels, as its offers show it to renters."""
    return _fields(value, field, _SANDBOX, required=("kind", "network"))


_TFLOPS = nullable(_num(0, 1e6))
_BENCHMARK = {
    "index": nullable(_int(0, MAX_GPU_INDEX)),
    "device": nullable(_text()),
    "kind": _choice("gpu", "cpu"),
    "backend": nullable(_text(32)),
    "fp32_tflops": _TFLOPS,
    "fp16_tflops": _TFLOPS,
    "bf16_tflops": _TFLOPS,
    "expected_fp16_tflops_min": _TFLOPS,
    "fp32_gflops": nullable(_num(0, 1e9)),
    "fp64_gflops": nullable(_num(0, 1e9)),
    "memory_bandwidth_gbs": nullable(_num(0, 1e6)),
    "allocatable_mib": nullable(_int(0, MAX_MIB)),
    "memory_free_mib": nullable(_int(0, MAX_MIB)),
    "memory_total_mib": nullable(_int(0, MAX_MIB)),
    "measured_at": nullable(_text(64)),
    "score": _TFLOPS,
    "flagged": boolean,
    "flag_reason": nullable(_text(TEXT)),
    "not_measured": nullable(_text(TEXT)),
    "note": nullable(_text(TEXT)),
    "error": nullable(_text(TEXT)),
    "gpus": _int(1, MAX_GPUS),
    "advertised_model": nullable(_text()),
}


def validate_benchmark(value: Any, field: str = "benchmark") -> dict[str, Any]:
    """A host's self-test result of one offer (see host/selftest.py)."""
    return _fields(value, field, _BENCHMARK)


def _indices(value: Any, field: str) -> list[int]:
    return [
        integer(v, f"{field}[{i}]", 0, MAX_GPU_INDEX)
        for i, v in enumerate(items(value, field, MAX_GPUS))
    ]


_OFFER = {
    "gpu_model": _text(),
    "gpu_count": _int(0, MAX_GPUS),
    "gpu_memory_mib": _int(0, MAX_MIB),
    "gpu_indices": _indices,
    "price_per_second_micro": _int(0, MAX_PRICE_PER_SECOND_MICRO),
    "benchmark": validate_benchmark,
    "shared": boolean,
    "sandbox": validate_sandbox,
}


def validate_offer(value: Any, field: str) -> dict[str, Any]:
    """One offer of a hello."""
    offer = _fields(
        value,
        field,
        _OFFER,
        required=("gpu_model", "gpu_count", "gpu_memory_mib", "price_per_second_micro"),
    )
    if not offer["gpu_model"]:
        raise HostMessageError(f"{field}.gpu_model must not be empty")
    return offer


def validate_hello(data: Any) -> dict[str, Any]:
    """A host's hello, clean: its GPUs, offers (each with its sandbox), sessions, schedule.

    A host-level ``sandbox`` is accepted too: it is the sandbox of every offer that does not
    carry its own.
    """
    hello = mapping(data, "hello")
    out: dict[str, Any] = {"type": "hello"}
    if "host_agent_version" in hello:
        out["host_agent_version"] = nullable(_text(64))(
            hello["host_agent_version"], "host_agent_version"
        )
    out["gpus"] = [
        _fields(g, f"gpus[{i}]", _GPU, required=("index",))
        for i, g in enumerate(items(hello.get("gpus", []), "gpus", MAX_GPUS))
    ]
    host_sandbox = None
    if hello.get("sandbox") is not None:
        host_sandbox = validate_sandbox(hello["sandbox"], "sandbox")
        out["sandbox"] = host_sandbox
    offers = []
    for i, raw in enumerate(items(hello.get("offers", []), "offers", MAX_OFFERS)):
        offer = validate_offer(raw, f"offers[{i}]")
        if "sandbox" not in offer and host_sandbox is not None:
            offer["sandbox"] = dict(host_sandbox)
        offers.append(offer)
    out["offers"] = offers
    max_kernels = hello.get("max_kernels", 1)
    out["max_kernels"] = integer(max_kernels, "max_kernels", 1, MAX_SESSIONS)
    out["sessions"] = [
        text(s, f"sessions[{i}]")
        for i, s in enumerate(items(hello.get("sessions", []), "sessions", MAX_SESSIONS))
    ]
    schedule = hello.get("schedule")
    out["schedule"] = None if schedule in (None, "") else text(schedule, "schedule", TEXT)
    offset = hello.get("utc_offset_s")
    out["utc_offset_s"] = 0 if offset is None else integer(offset, "utc_offset_s", -86_400, 86_400)
    return out


# -- heartbeat -------------------------------------------------------------------------------

_GPU_SAMPLE = {
    "index": _int(0, MAX_GPU_INDEX),
    "utilization_pct": nullable(_int(0, 100)),
    "memory_used_mib": nullable(_int(0, MAX_MIB)),
    "memory_total_mib": nullable(_int(0, MAX_MIB)),
    "temperature_c": nullable(_num(-100, 300)),
    "power_w": nullable(_num(0, 100_000)),
    "error": _text(TEXT),
}

_LOAD = nullable(_num(0, 1e6))
_CPU = {
    "cpu_count": _int(1, 1 << 16),
    "load_1m": _LOAD,
    "load_5m": _LOAD,
    "load_15m": _LOAD,
    "memory_total_mib": nullable(_int(0, MAX_MIB)),
    "memory_available_mib": nullable(_int(0, MAX_MIB)),
    "memory_used_mib": nullable(_int(0, MAX_MIB)),
}


def _gpu_samples(value: Any, field: str) -> list[dict[str, Any]]:
    return [
        _fields(g, f"{field}[{i}]", _GPU_SAMPLE, required=("index",))
        for i, g in enumerate(items(value, field, MAX_GPUS))
    ]


_TELEMETRY = {
    "source": _choice("nvml", "cpu"),
    "gpus": _gpu_samples,
    "cpu": lambda value, field: _fields(value, field, _CPU),
    "kernels": _int(0, MAX_SESSIONS),
}


def validate_telemetry(value: Any, field: str = "telemetry") -> dict[str, Any]:
    """A heartbeat's telemetry (host/inventory.py), only the keys renters are shown."""
    return _fields(value, field, _TELEMETRY)


def validate_heartbeat(data: Any) -> dict[str, Any] | None:
    """A heartbeat's clean telemetry (None when it carries none)."""
    heartbeat = mapping(data, "heartbeat")
    telemetry = heartbeat.get("telemetry")
    return None if telemetry is None else validate_telemetry(telemetry)


MAX_BUSY_SESSIONS = 4096
_SESSION_ID = re.compile(r"s-[0-9a-f]{1,64}")


def heartbeat_busy(data: Any) -> frozenset[str] | None:
    """The sessions a heartbeat says are running a cell (None: it does not say)."""
    busy = mapping(data, "heartbeat").get("busy_sessions")
    if busy is None:
        return None
    if not isinstance(busy, list) or len(busy) > MAX_BUSY_SESSIONS:
        raise HostMessageError(f"busy_sessions must be a list of at most {MAX_BUSY_SESSIONS}")
    if not all(isinstance(s, str) and _SESSION_ID.fullmatch(s) for s in busy):
        raise HostMessageError("busy_sessions must hold session ids")
    return frozenset(busy)


# -- what a host says about its sessions -----------------------------------------------------


def validate_session_report(data: Any) -> dict[str, str]:
    """``kernel_ready``, ``kernel_failed`` or ``kernel_ended``: the session and the reason.

    The reason and message go to the renter, so they are cut to a sentence rather than
    refused (an agent's error text can be long).
    """
    report = mapping(data, "message")
    kind = message_kind(report)
    out = {"session_id": text(report.get("session_id"), "session_id")}
    for name, limit, default in (("reason", 64, kind), ("message", TEXT, "")):
        value = report.get(name)
        if value is None:
            out[name] = default
            continue
        if not isinstance(value, str):
            raise HostMessageError(f"{name} must be a string")
        # Not printable: newlines, escapes, lone surrogates (which are not UTF-8).
        out[name] = "".join(c if c.isprintable() else " " for c in value[:limit])
    return out
