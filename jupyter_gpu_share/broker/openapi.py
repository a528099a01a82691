"""The OpenAPI 3 description of the broker's REST API, served at /gpu-share/api/openapi.json."""

from __future__ import annotations

from typing import Any

from .._version import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {**_json(schema, description), "required": True}


def _path_param(name: str, pattern: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": pattern, "minLength": 1},
    }


_ERRORS = {
    "400": _json(_ref("Error"), "malformed or invalid request"),
    "401": _json(_ref("Error"), "missing or invalid token"),
    "403": _json(_ref("Error"), "the token's role may not do this"),
    "404": _json(_ref("Error"), "not found (or not yours)"),
    "402": _json(_ref("Error"), "not enough credit for this"),
    "409": _json(_ref("Error"), "contradicts what the broker holds"),
    "429": _json(_ref("Error"), "too many requests for this token (see Retry-After)"),
    "503": _json(_ref("Error"), "the database is busy (see Retry-After)"),
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["message"],
        "properties": {"message": {"type": "string"}, "reason": {"type": ["string", "null"]}},
    },
    "Account": {
        "type": "object",
        "required": ["name", "role", "balance_micro"],
        "properties": {
            "name": {"type": "string"},
            "role": {"type": "string", "enum": ["user", "host", "teacher", "admin", "system"]},
            "balance_micro": {"type": "integer"},
            "available_micro": {"type": "integer"},
            "earnings_micro": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "Caps": {
        "type": "object",
        "required": ["session_cap_micro", "day_cap_micro", "spent_today_micro", "warn_percent"],
        "properties": {
            "session_cap_micro": {"type": ["integer", "null"]},
            "day_cap_micro": {"type": ["integer", "null"]},
            "idle_limit_s": {"type": ["integer", "null"]},
            "idle_default_s": {"type": "integer"},
            "spent_today_micro": {"type": "integer"},
            "warn_percent": {"type": "integer"},
            "day_started_at": {"type": "string", "format": "date-time"},
        },
    },
    "Token": {
        "type": "object",
        "required": ["id", "state", "created_at"],
        "properties": {
            "id": {"type": "string", "description": "first 8 hex digits of the token's SHA-256"},
            "state": {"type": "string", "enum": ["active", "expired", "revoked"]},
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
            "last_used_at": {"type": ["string", "null"], "format": "date-time"},
            "revoked_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "Offer": {
        "type": "object",
        "required": [
            "id",
            "host_id",
            "gpu_model",
            "gpu_count",
            "gpu_memory_mib",
            "price_per_hour_micro",
        ],
        "properties": {
            "id": {"type": "integer"},
            "host_id": {"type": "string"},
            "gpu_model": {"type": "string", "description": "'CPU' for a host without a GPU"},
            "gpu_count": {"type": "integer", "minimum": 0},
            "gpu_memory_mib": {"type": "integer", "minimum": 0},
            "price_per_second_micro": {"type": "integer", "minimum": 0},
            "price_per_hour_micro": {"type": "integer", "minimum": 0},
            "state": {"type": "string", "enum": ["free", "busy"]},
            "telemetry": _ref("Telemetry"),
            "reliability": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "shared": {"type": "boolean", "description": "several renters may use the GPU"},
            "speed": {
                "type": ["object", "null"],
                "description": "the host's self-test of this offer (score, TFLOPS, flagged)",
            },
            "sandbox": {
                "oneOf": [_ref("Sandbox"), {"type": "null"}],
                "description": "how the host isolates renters' kernels, as the host reports it; "
                "null when the host does not say",
            },
        },
    },
    "Telemetry": {
        "type": "object",
        "description": "the host's last heartbeat, checked by the broker; other keys are dropped",
        "properties": {
            "source": {"type": "string", "enum": ["nvml", "cpu"]},
            "kernels": {"type": "integer", "minimum": 0},
            "gpus": {
                "type": "array",
                "maxItems": 64,
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "utilization_pct": {"type": ["integer", "null"]},
                        "memory_used_mib": {"type": ["integer", "null"]},
                        "memory_total_mib": {"type": ["integer", "null"]},
                        "temperature_c": {"type": ["number", "null"]},
                        "power_w": {"type": ["number", "null"]},
                        "error": {"type": "string"},
                    },
                },
            },
            "cpu": {
                "type": "object",
                "properties": {
                    name: {"type": ["number", "null"]}
                    for name in (
                        "cpu_count",
                        "load_1m",
                        "load_5m",
                        "load_15m",
                        "memory_total_mib",
                        "memory_available_mib",
                        "memory_used_mib",
                    )
                },
            },
        },
    },
    "Sandbox": {
        "type": "object",
        "required": ["kind", "network"],
        "properties": {
            "kind": {"type": "string", "enum": ["bwrap", "none"]},
            "network": {
                "type": "string",
                "enum": ["none", "public", "allowlist", "host"],
                "description": "none: no network; public: the internet only, never the host's "
                "loopback or LAN; allowlist: only the host's list; host: the host's own network",
            },
            "uid": {"type": "string", "enum": ["dedicated", "agent"]},
            "limits": {
                "type": "object",
                "properties": {
                    "memory_mib": {"type": ["integer", "null"], "minimum": 0},
                    "max_processes": {"type": ["integer", "null"], "minimum": 0},
                    "cpu": {"type": ["number", "null"], "minimum": 0},
                    "scratch_mib": {"type": ["integer", "null"], "minimum": 0},
                    "bandwidth_kbit": {"type": ["integer", "null"], "minimum": 0},
                    "connections_per_minute": {"type": ["integer", "null"], "minimum": 0},
                },
            },
            "enforced": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
            "unenforced": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
        },
    },
    "SessionRequest": {
        "type": "object",
        "properties": {
            "offer_id": {"type": "integer", "minimum": 0},
            "gpu_model": {"type": "string", "minLength": 1},
            "min_gpu_memory_mib": {"type": "integer", "minimum": 0},
            "max_price_per_hour_micro": {"type": "integer", "minimum": 0},
            "min_reliability": {"type": "number", "minimum": 0, "maximum": 1},
            "class": {"type": "string", "description": "run on this class's pool, charged to it"},
            "idle_limit_s": {
                "type": "integer",
                "minimum": 0,
                "maximum": 7 * 86_400,
                "description": "seconds it may be idle (no cell running, its GPUs unused) "
                "before it is stopped as 'idle' (0: never; default: yours, else the broker's)",
            },
            "keep_alive_s": {
                "type": "integer",
                "minimum": 1,
                "maximum": 3600,
                "description": "seconds it may run with no client connected before it is "
                "stopped as 'client gone' (default: 600 idle, 3600 while a cell runs; the "
                "maximum: the broker's settings)",
            },
        },
    },
    "Class": {
        "type": "object",
        "required": ["name", "teacher", "your_role"],
        "properties": {
            "name": {"type": "string"},
            "teacher": {"type": "string"},
            "your_role": {"type": "string", "enum": ["teacher", "student", "admin"]},
            "budget_micro": {"type": "integer"},
            "quota_seconds": {"type": ["integer", "null"]},
            "quota_micro": {"type": ["integer", "null"]},
            "weekly_quota_seconds": {"type": ["integer", "null"]},
            "gpu_model": {"type": ["string", "null"]},
            "max_price_per_hour_micro": {"type": ["integer", "null"]},
            "starts_at": {"type": ["string", "null"], "format": "date-time"},
            "ends_at": {"type": ["string", "null"], "format": "date-time"},
            "kernel_name": {"type": "string"},
        },
    },
    "Session": {
        "type": "object",
        "required": ["id", "state", "host_id"],
        "properties": {
            "id": {"type": "string"},
            "state": {"type": "string", "enum": ["starting", "running", "stopping", "ended"]},
            "host_id": {"type": "string"},
            "offer_id": {"type": "integer"},
            "price_per_hour_micro": {"type": "integer"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "ended_at": {"type": ["string", "null"], "format": "date-time"},
            "end_reason": {"type": ["string", "null"]},
            "billed_seconds": {"type": ["integer", "null"]},
            "amount_micro": {"type": ["integer", "null"]},
            "cost_so_far_micro": {"type": "integer"},
            "relay_path": {"type": ["string", "null"]},
            "broker_url": {
                "type": ["string", "null"],
                "description": "the public URL of the broker that serves the session's host "
                "(several brokers on one store): its relay is there",
            },
            "class": {"type": ["string", "null"]},
            "stops_at_us": {
                "type": ["integer", "null"],
                "description": "when the broker will stop it (quota or credit) if nothing changes",
            },
            "idle_stop_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "when it will be stopped for being idle, once warned",
            },
            "cell_running": {
                "type": ["boolean", "null"],
                "description": "whether its host last said the kernel is running a cell "
                "(null once it ended): with no client connected, such a session is kept "
                "orphan_max_keep_alive_s rather than orphan_grace_s",
            },
        },
    },
    "Receipt": {
        "type": "object",
        "description": "A settlement, signed (Ed25519, base64url) over its canonical JSON "
        "(sorted keys, no spaces, UTF-8) without the signature; prev_hash is the SHA-256 of "
        "the previous receipt's canonical JSON, signature included (64 zeros for the first)",
        "required": [
            "version",
            "session_id",
            "renter",
            "payer",
            "host",
            "price_per_second_micro",
            "started_us",
            "ended_us",
            "billed_seconds",
            "amount_micro",
            "fee_micro",
            "host_micro",
            "end_reason",
            "transaction_id",
            "sequence",
            "prev_hash",
            "key_id",
            "signature",
        ],
        "properties": {
            "version": {"type": "integer", "const": 1},
            "session_id": {"type": "string"},
            "renter": {"type": "string"},
            "payer": {"type": "string"},
            "host": {"type": "string"},
            "price_per_second_micro": {"type": "integer", "minimum": 0},
            "started_us": {"type": ["integer", "null"], "description": "null: never ready"},
            "ended_us": {"type": "integer"},
            "billed_seconds": {"type": "integer", "minimum": 0},
            "amount_micro": {"type": "integer", "minimum": 0},
            "fee_micro": {"type": "integer", "minimum": 0},
            "host_micro": {"type": "integer", "minimum": 0},
            "end_reason": {"type": "string"},
            "transaction_id": {
                "type": ["integer", "null"],
                "description": "the ledger's settlement transaction; null when nothing was owed",
            },
            "sequence": {"type": "integer", "minimum": 1},
            "prev_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "key_id": {
                "type": "string",
                "description": "first 16 hex digits of the SHA-256 of the raw public key",
            },
            "signature": {"type": "string"},
        },
    },
    "ReceiptKey": {
        "type": "object",
        "required": ["key_id", "public_key_pem"],
        "properties": {
            "key_id": {"type": "string"},
            "public_key_pem": {"type": "string", "description": "Ed25519, SubjectPublicKeyInfo"},
        },
    },
}


INT64_MAX = 2**63 - 1


def _bound_integers(node: Any) -> Any:
    """Give every integer schema the ledger's 64-bit bound (the handlers refuse past it)."""
    if isinstance(node, dict):
        if node.get("type") == "integer" or node.get("type") == ["integer", "null"]:
            node.setdefault("maximum", INT64_MAX)
        for value in node.values():
            _bound_integers(value)
    elif isinstance(node, list):
        for value in node:
            _bound_integers(value)
    return node


def _nullable_optionals(document: dict[str, Any]) -> dict[str, Any]:
    """In request bodies, an optional field may be null: the handlers read null as "not
    given" (the default), and the document says so."""
    schemas = document["components"]["schemas"]
    for item in document["paths"].values():
        for operation in item.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if not body:
                continue
            schema = body["schema"]
            if "$ref" in schema:
                schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
            required = set(schema.get("required", ()))
            for name, field in schema.get("properties", {}).items():
                kind = field.get("type")
                if name not in required and isinstance(kind, str):
                    field["type"] = [kind, "null"]
    return document


def openapi_document() -> dict[str, Any]:
    """Describe the broker's REST API."""
    return _nullable_optionals(_bound_integers(_document()))


def _document() -> dict[str, Any]:
    # The patterns are the routes' own (handlers.py, class_handlers.py): a value outside
    # them is no route at all, answered with a JSON 404.
    name_param = _path_param("name", r"^[^/]+$")
    sid_param = _path_param("session_id", r"^s-[0-9a-f]{1,64}$")
    class_param = _path_param("name", r"^[A-Za-z0-9_.-]{1,58}$")
    student_param = _path_param("student", r"^[A-Za-z0-9_.@-]{1,64}$")
    nb_param = _path_param("notebook", r"^[^/]+\.ipynb$")
    ok = {"200": _json({"type": "object"}, "done"), **_ERRORS}
    return {
        "openapi": "3.1.0",
        "info": {"title": "jupyter-gpu-share broker", "version": __version__},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
        },
        "security": [{"bearer": []}],
        "paths": {
            "/gpu-share/api/health": {
                "get": {
                    "summary": "Whether this broker serves now (for load balancers; no token)",
                    "security": [],
                    "responses": {
                        "200": _json({"type": "object"}, "serving"),
                        "503": _json({"type": "object"}, "not serving, with the reason"),
                    },
                }
            },
            "/gpu-share/api/me": {
                "get": {
                    "summary": "The caller's account",
                    "responses": {"200": _json(_ref("Account"), "account"), **_ERRORS},
                }
            },
            "/gpu-share/api/me/caps": {
                "get": {
                    "summary": "Your spending caps, and what your own sessions cost today (UTC)",
                    "responses": {"200": _json(_ref("Caps"), "the caps"), **_ERRORS},
                },
                "put": {
                    "summary": "Set your spending caps and idle limit (a field left out "
                    "keeps its value; null: none); the brokers stop your sessions at them, "
                    "warn at 80 %, and apply a change to running sessions within seconds",
                    "requestBody": _body(
                        {
                            "type": "object",
                            "properties": {
                                "session_cap_micro": {
                                    "type": ["integer", "null"],
                                    "minimum": 0,
                                },
                                "day_cap_micro": {"type": ["integer", "null"], "minimum": 0},
                                "idle_limit_s": {
                                    "type": ["integer", "null"],
                                    "minimum": 0,
                                    "maximum": 7 * 86_400,
                                },
                            },
                        },
                        "the caps",
                    ),
                    "responses": {"200": _json(_ref("Caps"), "the caps"), **_ERRORS},
                },
            },
            "/gpu-share/api/accounts": {
                "post": {
                    "summary": "Create an account (admin)",
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["name", "role"],
                            "properties": {
                                "name": {"type": "string", "pattern": r"^[A-Za-z0-9_.@-]{1,64}$"},
                                "role": {"enum": ["user", "host", "teacher", "admin"]},
                            },
                        },
                        "name and role",
                    ),
                    "responses": {
                        "201": _json(_ref("Account"), "created"),
                        "200": _json(_ref("Account"), "exists"),
                        **_ERRORS,
                    },
                }
            },
            "/gpu-share/api/accounts/{name}/tokens": {
                "get": {
                    "summary": "List an account's tokens: ids, times, states, no secrets (admin)",
                    "parameters": [name_param],
                    "responses": {
                        "200": _json({"type": "array", "items": _ref("Token")}, "the tokens"),
                        **_ERRORS,
                    },
                },
                "post": {
                    "summary": "Issue a new token for an account, optionally expiring (admin)",
                    "parameters": [name_param],
                    "requestBody": _json(
                        {
                            "type": "object",
                            "properties": {
                                "expires_in_s": {
                                    "type": "integer",
                                    "minimum": 1,
                                    "maximum": 10 * 365 * 86_400,
                                    "description": "lifetime in seconds; absent: until revoked",
                                }
                            },
                        },
                        "optional lifetime",
                    ),
                    "responses": {
                        "201": _json({"type": "object"}, "the token (gs_...), shown once"),
                        **_ERRORS,
                    },
                },
                "delete": {
                    "summary": "Revoke every active token of an account (admin)",
                    "parameters": [name_param],
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"revoked": {"type": "integer"}}},
                            "how many tokens were revoked",
                        ),
                        **_ERRORS,
                    },
                },
            },
            "/gpu-share/api/accounts/{name}/credit": {
                "post": {
                    "summary": "Add credit to an account (admin)",
                    "parameters": [name_param],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["amount_micro"],
                            "properties": {"amount_micro": {"type": "integer", "minimum": 1}},
                        },
                        "amount in micro-credits",
                    ),
                    "responses": {"200": _json(_ref("Account"), "new balance"), **_ERRORS},
                }
            },
            "/gpu-share/api/offers": {
                "get": {
                    "summary": "Offers of online hosts",
                    "responses": {
                        "200": _json({"type": "array", "items": _ref("Offer")}, "offers"),
                        **_ERRORS,
                    },
                }
            },
            "/gpu-share/api/sessions": {
                "get": {
                    "summary": "The caller's sessions",
                    "responses": {
                        "200": _json({"type": "array", "items": _ref("Session")}, "sessions"),
                        **_ERRORS,
                    },
                },
                "post": {
                    "summary": "Start a remote kernel session (user)",
                    "requestBody": _json(_ref("SessionRequest"), "what to rent"),
                    "responses": {
                        "201": _json(_ref("Session"), "started; connect the relay"),
                        "402": _json(_ref("Error"), "not enough credit for the minimum period"),
                        "409": _json(_ref("Error"), "every matching offer is busy"),
                        **_ERRORS,
                    },
                },
            },
            "/gpu-share/api/sessions/{session_id}": {
                "get": {
                    "summary": "One session",
                    "parameters": [sid_param],
                    "responses": {"200": _json(_ref("Session"), "session"), **_ERRORS},
                },
                "delete": {
                    "summary": "Stop a session; billing ends now",
                    "parameters": [sid_param],
                    "responses": {
                        "200": _json(_ref("Session"), "ended and settled"),
                        "202": _json(
                            _ref("Session"),
                            "stopping: the kernel is stopped and billing ended now; the "
                            "settlement waits for the database and is retried until it commits",
                        ),
                        **_ERRORS,
                    },
                },
            },
            "/gpu-share/api/earnings": {
                "get": {"summary": "A host's earnings per session and day (host)", "responses": ok}
            },
            "/gpu-share/api/classes": {
                "get": {
                    "summary": "Your classes (as teacher or student)",
                    "responses": {
                        "200": _json({"type": "array", "items": _ref("Class")}, "classes"),
                        **_ERRORS,
                    },
                },
                "post": {
                    "summary": "Create a class (teacher, admin)",
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,58}$"},
                                "teacher": {
                                    "type": "string",
                                    "description": "an admin names the teacher (default: the "
                                    "admin itself); a teacher's own classes are theirs",
                                },
                                "quota_seconds": {"type": "integer", "minimum": 1},
                                "quota_micro": {"type": "integer", "minimum": 1},
                                "weekly_quota_seconds": {"type": "integer", "minimum": 1},
                                "gpu_model": {"type": "string", "minLength": 1},
                                "max_price_per_hour_micro": {"type": "integer", "minimum": 0},
                                "budget_micro": {"type": "integer", "minimum": 0},
                                "starts_at": {"type": "string", "format": "date-time"},
                                "ends_at": {"type": "string", "format": "date-time"},
                            },
                            "anyOf": [
                                {"required": ["quota_seconds"]},
                                {"required": ["quota_micro"]},
                            ],
                        },
                        "the class; a per-student quota (seconds or credits) is required",
                    ),
                    "responses": {
                        "201": _json(_ref("Class"), "created"),
                        "409": _json(_ref("Error"), "exists"),
                        **_ERRORS,
                    },
                },
            },
            "/gpu-share/api/classes/{name}": {
                "get": {
                    "summary": "One class (members)",
                    "parameters": [class_param],
                    "responses": {"200": _json(_ref("Class"), "class"), **_ERRORS},
                }
            },
            "/gpu-share/api/classes/{name}/budget": {
                "post": {
                    "summary": "Add to the budget (admin grant; teacher transfer)",
                    "parameters": [class_param],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["amount_micro"],
                            "properties": {"amount_micro": {"type": "integer", "minimum": 1}},
                        },
                        "micro-credits to add",
                    ),
                    "responses": ok,
                }
            },
            "/gpu-share/api/classes/{name}/students": {
                "get": {
                    "summary": "The roster (teacher)",
                    "parameters": [class_param],
                    "responses": {
                        "200": _json({"type": "array", "items": {"type": "string"}}, "students"),
                        **_ERRORS,
                    },
                },
                "post": {
                    "summary": "Enrol students; tokens of new accounts",
                    "parameters": [class_param],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["students"],
                            "properties": {
                                "students": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 1000,
                                    "items": {
                                        "type": "string",
                                        "pattern": r"^[A-Za-z0-9_.@-]{1,64}$",
                                    },
                                }
                            },
                        },
                        "user names to enrol",
                    ),
                    "responses": ok,
                },
            },
            "/gpu-share/api/classes/{name}/students/{student}": {
                "delete": {
                    "summary": "Take a student off the roster",
                    "parameters": [class_param, student_param],
                    "responses": ok,
                }
            },
            "/gpu-share/api/classes/{name}/students/{student}/stop": {
                "post": {
                    "summary": "Stop a student's running kernel",
                    "parameters": [class_param, student_param],
                    "responses": ok,
                }
            },
            "/gpu-share/api/classes/{name}/notebooks": {
                "get": {
                    "summary": "The class notebooks",
                    "parameters": [class_param],
                    "responses": {
                        "200": _json({"type": "array", "items": {"type": "object"}}, "notebooks"),
                        **_ERRORS,
                    },
                }
            },
            "/gpu-share/api/classes/{name}/notebooks/{notebook}": {
                "get": {
                    "summary": "One notebook, set to open on the class kernel",
                    "parameters": [class_param, nb_param],
                    "responses": ok,
                },
                "put": {
                    "summary": "Publish a starter notebook (teacher)",
                    "parameters": [class_param, nb_param],
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["cells", "nbformat", "nbformat_minor", "metadata"],
                            "properties": {
                                "cells": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["cell_type", "source", "metadata"],
                                        "properties": {
                                            "cell_type": {"enum": ["code", "markdown", "raw"]},
                                            "metadata": {"type": "object"},
                                        },
                                    },
                                },
                                "nbformat": {"const": 4},
                                "nbformat_minor": {"type": "integer", "minimum": 0, "maximum": 5},
                                "metadata": {"type": "object"},
                            },
                            "description": "an nbformat 4 notebook, checked against nbformat's "
                            "own JSON schema (a 400 names what it breaks)",
                        },
                        "the notebook",
                    ),
                    "responses": {
                        "201": _json({"type": "object"}, "published"),
                        "200": _json({"type": "object"}, "replaced"),
                        **_ERRORS,
                    },
                },
            },
            "/gpu-share/api/classes/{name}/usage": {
                "get": {
                    "summary": "Use per student (a student sees their own row)",
                    "parameters": [class_param],
                    "responses": ok,
                }
            },
            "/gpu-share/api/sessions/{session_id}/receipt": {
                "get": {
                    "summary": "A settled session's signed receipt (renter, payer, host, admin)",
                    "parameters": [sid_param],
                    "responses": {"200": _json(_ref("Receipt"), "receipt"), **_ERRORS},
                }
            },
            "/gpu-share/api/receipts/public-key": {
                "get": {
                    "summary": "The public key that checks receipts, and its key_id",
                    "responses": {"200": _json(_ref("ReceiptKey"), "public key"), **_ERRORS},
                }
            },
            "/gpu-share/api/receipts": {
                "get": {
                    "summary": "The receipt chain in sequence order, paged (admin)",
                    "parameters": [
                        {
                            "name": "after",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "receipts": {"type": "array", "items": _ref("Receipt")},
                                    "next_after": {"type": ["integer", "null"]},
                                },
                            },
                            "receipts after 'after'; next_after: the next page's 'after'",
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/gpu-share/api/ledger/check": {
                "get": {
                    "summary": "Check that every transaction balances and every balance (admin)",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "ok": {"type": "boolean"},
                                    "problems": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                            "the ledger's problems; none: ok",
                        ),
                        **_ERRORS,
                    },
                }
            },
        },
    }
