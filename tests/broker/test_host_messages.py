"""A host's hello and heartbeat, checked field by field: what the agent sends passes, hostile
values are refused with the field's name, unknown keys are dropped."""

from __future__ import annotations

import json
from typing import Any

import pytest

from jupyter_gpu_share.broker.host_messages import (
    HEARTBEAT_MAX_BYTES,
    HELLO_MAX_BYTES,
    HostMessageError,
    check_depth,
    message_kind,
    parse_control,
    validate_heartbeat,
    validate_hello,
    validate_sandbox,
    validate_session_report,
)
from jupyter_gpu_share.host.inventory import cpu_telemetry
from jupyter_gpu_share.host.selftest import make_result

SANDBOX = {
    "kind": "bwrap",
    "network": "public",
    "uid": "dedicated",
    "limits": {
        "memory_mib": 4096,
        "max_processes": 256,
        "cpu": 2.5,
        "scratch_mib": 10240,
        "bandwidth_kbit": 100_000,
        "connections_per_minute": 600,
    },
    "enforced": ["memory", "pids", "network"],
    "unenforced": ["scratch quota"],
}


def offer(**extra: Any) -> dict[str, Any]:
    return {
        "gpu_model": "NVIDIA A100-SXM4-80GB",
        "gpu_count": 1,
        "gpu_memory_mib": 81920,
        "gpu_indices": [0],
        "price_per_second_micro": 417,
        **extra,
    }


def hello(**extra: Any) -> dict[str, Any]:
    return {
        "type": "hello",
        "host_agent_version": "0.1.0",
        "gpus": [
            {"index": 0, "model": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920, "uuid": "GPU-1"}
        ],
        "offers": [offer()],
        "max_kernels": 4,
        "sessions": ["s-0123abcd"],
        "schedule": "mon-fri 18:00-08:00",
        "utc_offset_s": 3600,
        **extra,
    }


def telemetry(**extra: Any) -> dict[str, Any]:
    return {
        "source": "nvml",
        "gpus": [
            {
                "index": 0,
                "utilization_pct": 87,
                "memory_used_mib": 4000,
                "memory_total_mib": 81920,
                "temperature_c": 61,
                "power_w": 301.5,
            },
            {"index": 1, "error": "GPU is lost"},
        ],
        "cpu": cpu_telemetry(),
        "kernels": 1,
        **extra,
    }


def refused(check: Any, value: Any, *fragments: str) -> str:
    with pytest.raises(HostMessageError) as caught:
        check(value)
    text = str(caught.value)
    for fragment in fragments:
        assert fragment in text, text
    assert len(text) < 300 and "\n" not in text  # one line, never the hostile value itself
    return text


# -- what the agent sends passes ---------------------------------------------------------------


def test_the_agents_hello_passes_unchanged():
    benchmark = make_result(0, "NVIDIA A100-SXM4-80GB", "gpu", backend="torch", fp16_tflops=250.0)
    benchmark["advertised_model"] = "NVIDIA A100-SXM4-80GB"
    cpu_bench = make_result(None, "x86_64", "cpu", not_measured="numpy is not installed")
    data = hello(
        offers=[
            offer(benchmark=benchmark, shared=True, sandbox=SANDBOX),
            offer(
                gpu_model="CPU", gpu_count=0, gpu_memory_mib=0, gpu_indices=[], benchmark=cpu_bench
            ),
        ]
    )
    clean = validate_hello(json.loads(json.dumps(data)))
    assert clean["offers"][0] == data["offers"][0]
    assert clean["offers"][1]["benchmark"] == cpu_bench
    assert clean["gpus"] == data["gpus"] and clean["sessions"] == ["s-0123abcd"]
    assert clean["max_kernels"] == 4 and clean["utc_offset_s"] == 3600
    assert clean["schedule"] == data["schedule"]


def test_the_agents_telemetry_passes_unchanged():
    sample = telemetry()
    assert validate_heartbeat({"type": "heartbeat", "telemetry": sample}) == sample
    cpu_only = {"source": "cpu", "gpus": [], "cpu": cpu_telemetry(), "kernels": 0}
    assert validate_heartbeat({"type": "heartbeat", "telemetry": cpu_only}) == cpu_only
    assert validate_heartbeat({"type": "heartbeat"}) is None


def test_a_host_level_sandbox_is_every_offers_default():
    own = dict(SANDBOX, network="none")
    clean = validate_hello(hello(sandbox=SANDBOX, offers=[offer(), offer(sandbox=own)]))
    assert clean["offers"][0]["sandbox"] == SANDBOX
    assert clean["offers"][1]["sandbox"] == own
    assert "sandbox" not in validate_hello(hello())["offers"][0]


def test_unknown_keys_are_dropped_at_every_level():
    sample = telemetry(secret_scan_results="x" * 1000, nested={"a": [1, 2]})
    sample["gpus"][0]["fan_rpm"] = 1200
    sample["cpu"]["hostname"] = "my-laptop"
    clean = validate_heartbeat({"type": "heartbeat", "telemetry": sample})
    assert set(clean) == {"source", "gpus", "cpu", "kernels"}
    assert "fan_rpm" not in clean["gpus"][0] and "hostname" not in clean["cpu"]
    sandbox = validate_sandbox(dict(SANDBOX, extra={"x": 1}, limits=dict(SANDBOX["limits"], y=2)))
    assert "extra" not in sandbox and "y" not in sandbox["limits"]
    clean_hello = validate_hello(hello(banner="hello renters", offers=[offer(ad="buy now")]))
    assert "banner" not in clean_hello and "ad" not in clean_hello["offers"][0]


# -- hostile values are refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("gpu_count",), 10**30, "offers[0].gpu_count must be from 0 to 64"),
        (("gpu_count",), True, "offers[0].gpu_count must be an integer"),
        (("gpu_count",), 1.0, "must be an integer"),
        (("gpu_count",), "1", "must be an integer"),
        (("gpu_memory_mib",), -1, "offers[0].gpu_memory_mib"),
        (("price_per_second_micro",), 10**30, "price_per_second_micro"),
        (("gpu_model",), "x" * 100_000, "at most 128 characters"),
        (("gpu_model",), "", "must not be empty"),
        (("gpu_model",), "\x1b[2J\x1b[31mA100", "control characters"),
        (("gpu_model",), "A100\u202e", "control characters"),
        (("gpu_model",), "\ud800", "not valid UTF-8"),
        (("gpu_model",), ["A100"], "must be a string"),
        (("gpu_indices",), list(range(65)), "at most 64 items"),
        (("gpu_indices",), [0, "1"], "gpu_indices[1] must be an integer"),
        (("shared",), "yes", "shared must be true or false"),
        (("benchmark",), [], "benchmark must be an object"),
        (("benchmark", "score"), float("nan"), "benchmark.score must be a finite number"),
        (("benchmark", "score"), float("inf"), "finite"),
        (("benchmark", "score"), 1e300, "from 0 to"),
        (("benchmark", "flag_reason"), "x" * 5000, "at most 1024"),
        (("sandbox", "network"), "everything", "sandbox.network must be one of none, public"),
        (("sandbox", "kind"), None, "sandbox.kind must be one of"),
        (("sandbox", "limits", "memory_mib"), 10**30, "sandbox.limits.memory_mib"),
        (("sandbox", "limits", "cpu"), float("nan"), "sandbox.limits.cpu"),
        (("sandbox", "limits", "max_processes"), False, "must be an integer"),
        (("sandbox", "enforced"), ["x"] * 17, "sandbox.enforced must have at most 16"),
        (("sandbox", "unenforced"), ["x" * 65], "at most 64 characters"),
        (("sandbox", "limits"), "none", "sandbox.limits must be an object"),
    ],
)
def test_a_hostile_offer_field_is_refused_by_name(path, value, fragment):
    sandbox = json.loads(json.dumps(SANDBOX))  # a copy to spoil
    data = hello(offers=[offer(benchmark={"kind": "gpu", "score": 1.0}, sandbox=sandbox)])
    target = data["offers"][0]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    refused(validate_hello, data, fragment)


def test_a_sandbox_needs_its_kind_and_network():
    refused(validate_sandbox, {"network": "none"}, "sandbox.kind is required")
    refused(validate_sandbox, {"kind": "bwrap"}, "sandbox.network is required")
    refused(validate_sandbox, "bwrap", "sandbox must be an object")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("offers", [offer()] * 65, "offers must have at most 64 items"),
        ("offers", {"0": offer()}, "offers must be a list"),
        ("gpus", [{"index": 0}] * 65, "gpus must have at most 64"),
        ("gpus", [{"index": 10**30}], "gpus[0].index"),
        ("gpus", [{"model": "A100"}], "gpus[0].index is required"),
        ("sessions", ["s-1"] * 1025, "sessions must have at most 1024"),
        ("sessions", [{"id": "s-1"}], "sessions[0] must be a string"),
        ("max_kernels", 10**30, "max_kernels must be from 1 to 1024"),
        ("max_kernels", 0, "max_kernels"),
        ("utc_offset_s", 10**30, "utc_offset_s"),
        ("schedule", "x" * 100_000, "schedule must be at most"),
        ("host_agent_version", {"v": 1}, "host_agent_version must be a string"),
        ("sandbox", {"kind": "docker", "network": "none"}, "sandbox.kind must be one of"),
    ],
)
def test_a_hostile_hello_field_is_refused_by_name(field, value, fragment):
    refused(validate_hello, hello(**{field: value}), fragment)


def test_an_offer_needs_its_core_fields():
    bare = offer()
    del bare["price_per_second_micro"]
    refused(validate_hello, hello(offers=[bare]), "offers[0].price_per_second_micro is required")
    refused(validate_hello, hello(offers=["CPU"]), "offers[0] must be an object")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"kernels": 10**30}, "telemetry.kernels"),
        ({"kernels": True}, "telemetry.kernels must be an integer"),
        ({"source": "x" * 100}, "telemetry.source must be one of"),
        ({"gpus": [{"index": 0}] * 65}, "telemetry.gpus must have at most 64"),
        ({"gpus": [{"index": 0, "utilization_pct": 101}]}, "utilization_pct must be from 0 to 100"),
        ({"gpus": [{"index": 0, "power_w": float("inf")}]}, "power_w must be a finite number"),
        ({"gpus": [{"index": 0, "temperature_c": float("nan")}]}, "temperature_c"),
        ({"gpus": [{"index": 0, "error": "e" * 2000}]}, "error must be at most 1024"),
        ({"gpus": [{"utilization_pct": 5}]}, "telemetry.gpus[0].index is required"),
        ({"gpus": "all"}, "telemetry.gpus must be a list"),
        ({"cpu": {"load_1m": 10**30}}, "telemetry.cpu.load_1m"),
        ({"cpu": {"cpu_count": 0}}, "telemetry.cpu.cpu_count"),
        ({"cpu": [1]}, "telemetry.cpu must be an object"),
    ],
)
def test_hostile_telemetry_is_refused_by_name(change, fragment):
    refused(validate_heartbeat, {"type": "heartbeat", "telemetry": telemetry(**change)}, fragment)


def test_telemetry_must_be_an_object():
    refused(validate_heartbeat, {"type": "heartbeat", "telemetry": "x" * 10}, "telemetry must be")
    refused(validate_heartbeat, {"type": "heartbeat", "telemetry": []}, "telemetry must be")


# -- the message as a whole --------------------------------------------------------------------


def test_parse_control_caps_the_size_before_parsing():
    big = json.dumps({"type": "heartbeat", "telemetry": {"x": "a" * (100 * 1024 * 1024)}})
    text = refused(lambda m: parse_control(m, HEARTBEAT_MAX_BYTES), big, "over the 65536 limit")
    assert "aaaa" not in text
    refused(lambda m: parse_control(m, 10), "é" * 6, "12 bytes")  # bytes, not characters
    assert parse_control(json.dumps(hello()), HELLO_MAX_BYTES)["type"] == "hello"


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (b'{"type": "heartbeat", "telemetry": {"x": "\xff\xfe"}}', "not valid UTF-8"),
        (b"\xc3\x28", "not valid UTF-8"),
        ("[" * 200_000 + "]" * 200_000, "nested deeper"),
        ('{"type": "hello", "x": ' + "[" * 20 + "]" * 20 + "}", "nested deeper than 8"),
        ('{"type": "heartbeat", "telemetry": {"kernels": ' + "9" * 5000 + "}}", "not JSON"),
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"kind": "hello"}', "no 'type'"),
        ('{"type": {"nested": 1}}', "no 'type'"),
        ('{"type": "' + "x" * 1000 + '"}', "no 'type'"),
    ],
)
def test_parse_control_refuses_what_is_not_a_small_json_object(message, fragment):
    refused(lambda m: parse_control(m, 1024 * 1024), message, fragment)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_read_then_refused_by_the_field(constant):
    def heartbeat(telemetry: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps({"type": "heartbeat", "telemetry": telemetry}).replace('"C"', constant)
        return parse_control(text, 1024)

    for field in ("kernels", "gpus"):
        refused(validate_heartbeat, heartbeat({field: "C"}), f"telemetry.{field} must be")
    data = heartbeat({"cpu": {"load_1m": "C"}})
    refused(validate_heartbeat, data, "load_1m must be a finite number")
    assert validate_heartbeat(heartbeat({"unknown": "C"})) == {}


def test_message_kind_is_fit_to_print():
    assert message_kind({"type": "heartbeat"}) == "heartbeat"
    assert message_kind({"type": "\x1b[2J"}) == "control"
    assert message_kind({"type": "x" * 100}) == "control"
    assert message_kind([]) == "control"


def test_session_reports_are_checked_and_their_text_cut():
    report = {"type": "kernel_failed", "session_id": "s-1", "message": "boom\n" * 1000}
    clean = validate_session_report(report)
    assert clean["session_id"] == "s-1" and clean["reason"] == "kernel_failed"
    assert len(clean["message"]) == 1024 and "\n" not in clean["message"]
    refused(validate_session_report, {"type": "kernel_ready", "session_id": 5}, "session_id")
    refused(validate_session_report, {"type": "kernel_ready"}, "session_id must be a string")
    refused(
        validate_session_report,
        {"type": "kernel_ended", "session_id": "s-1", "reason": ["x"]},
        "reason must be a string",
    )
    odd = validate_session_report({"type": "kernel_ended", "session_id": "s-1", "reason": "\ud800"})
    assert odd["reason"] == " "  # a lone surrogate is not UTF-8: it cannot reach a renter


def test_eight_levels_pass_and_nine_do_not():
    check_depth({"a": [[[[[[{}]]]]]]})
    check_depth([{"a": 1}] * 1000)
    with pytest.raises(HostMessageError, match="deeper than 8"):
        check_depth({"a": [[[[[[[{}]]]]]]]})


def test_a_heartbeat_names_the_sessions_running_a_cell():
    from jupyter_gpu_share.broker.host_messages import heartbeat_busy

    assert heartbeat_busy({"type": "heartbeat"}) is None
    assert heartbeat_busy({"type": "heartbeat", "busy_sessions": ["s-1f", "s-2a"]}) == {
        "s-1f",
        "s-2a",
    }
    for bad in ("s-1", [1], ["x" * 70], ["../etc"], ["s-" + "a" * 65], ["s-1"] * 5000):
        with pytest.raises(HostMessageError):
            heartbeat_busy({"type": "heartbeat", "busy_sessions": bad})
