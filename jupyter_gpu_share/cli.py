"""``jupyter gpu-share <verb>``: the command line of brokers, hosts, renters and admins."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .client import BrokerClient, BrokerError
from .ledger import format_credits, parse_positive_credits

PROG = "jupyter gpu-share"
SERVER_VERBS = ("broker", "host", "demo")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400, "y": 365 * 86_400}
MAX_TOKEN_LIFETIME_S = 10 * DURATION_UNITS["y"]


class CommandError(Exception):
    """A problem to report on one line."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, naming the problem."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    if not rows:
        return "(none)"
    cells = [[title for _, title in columns]]
    cells += [
        ["" if row.get(key) is None else str(row.get(key)) for key, _ in columns] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _money(value: int | None) -> str | None:
    return None if value is None else format_credits(value)


def _client(args: argparse.Namespace) -> BrokerClient:
    return BrokerClient(args.broker, args.token, ca_file=getattr(args, "ca_file", None))


def parse_duration(text: str) -> int:
    """Parse a duration such as 30s, 15m, 12h, 30d, 2w or 1y (365 days) as seconds."""
    match = re.fullmatch(r"\s*(\d{1,12})\s*([smhdwy])\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30s, 12h, 30d or 1y")
    seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be more than zero: {text!r}")
    return seconds


def format_duration(seconds: int) -> str:
    """Write seconds in the largest unit of parse_duration that divides them (86400: 1d)."""
    for unit in "ywdhm":
        if seconds % DURATION_UNITS[unit] == 0 and seconds >= DURATION_UNITS[unit]:
            return f"{seconds // DURATION_UNITS[unit]}{unit}"
    return f"{seconds}s"


def token_lifetime(text: str) -> int:
    """Parse --expires-in: a duration from 1 s to 10 years, or an argparse error."""
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if seconds > MAX_TOKEN_LIFETIME_S:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than 10 years")
    return seconds


def _when(iso: str | None, missing: str = "never") -> str:
    """An ISO time as a short UTC date and minute, for tables."""
    if not iso:
        return missing
    from datetime import datetime, timezone

    moment = datetime.fromisoformat(iso).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def cmd_admin_token(args: argparse.Namespace) -> None:
    client = _client(args)
    account = client.request("POST", "/accounts", {"name": args.name, "role": args.role})
    body = None if args.expires_in is None else {"expires_in_s": args.expires_in}
    issued = client.request("POST", f"/accounts/{account['name']}/tokens", body)
    lifetime = (
        "until revoked" if args.expires_in is None else f"for {format_duration(args.expires_in)}"
    )
    named = f"token {issued['id']}" if issued.get("id") else "token"
    print(f"{named} for {issued['name']} ({issued['role']}), valid {lifetime}; shown only once:")
    print(issued["token"])


def cmd_admin_tokens(args: argparse.Namespace) -> None:
    listed = _client(args).request("GET", f"/accounts/{args.name}/tokens")
    if args.json:
        print(json.dumps(listed))
        return
    rows = [
        {
            **t,
            "created": _when(t["created_at"]),
            "expires": _when(t["expires_at"]),
            "used": _when(t["last_used_at"]),
        }
        for t in listed
    ]
    print(
        _table(
            rows,
            [
                ("id", "ID"),
                ("created", "CREATED"),
                ("expires", "EXPIRES"),
                ("used", "LAST USED"),
                ("state", "STATE"),
            ],
        )
    )


def cmd_admin_revoke(args: argparse.Namespace) -> None:
    answer = _client(args).request("DELETE", f"/accounts/{args.name}/tokens")
    print(f"revoked {answer['revoked']} token(s) of {answer['name']}")


def cmd_admin_credit(args: argparse.Namespace) -> None:
    try:
        amount = parse_positive_credits(args.amount)
    except ValueError as error:
        raise CommandError(f"AMOUNT {args.amount!r}: {error}") from None
    account = _client(args).request(
        "POST", f"/accounts/{args.name}/credit", {"amount_micro": amount}
    )
    print(f"{account['name']}: balance {format_credits(account['balance_micro'])} credits")


def cmd_balance(args: argparse.Namespace) -> None:
    me = _client(args).request("GET", "/me")
    if args.json:
        print(json.dumps(me))
        return
    label = "earnings" if me["role"] == "host" else "balance"
    print(f"{me['name']} ({me['role']}): {label} {format_credits(me['balance_micro'])} credits")
    if "available_micro" in me and me.get("running_sessions"):
        print(f"available after running sessions: {format_credits(me['available_micro'])} credits")


def _cap(text: str) -> int | None:
    """A cap as given: credits (a decimal) or "none"."""
    if text.strip().lower() in ("none", "off", ""):
        return None
    try:
        return parse_positive_credits(text)
    except ValueError as error:
        raise CommandError(f"a cap is credits above zero, or 'none': {error}") from None


def _idle(text: str) -> int | None:
    """An idle limit as given: a duration (30m, 2h), "never", or "default"."""
    word = text.strip().lower()
    if word == "default":
        return None
    if word in ("never", "0"):
        return 0
    try:
        return parse_duration(word)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise CommandError(
            f"an idle limit is a duration (30m, 2h), 'never' or 'default': {error}"
        ) from None


def cmd_caps(args: argparse.Namespace) -> None:
    client = _client(args)
    caps = client.request("GET", "/me/caps")
    if args.session is not None or args.day is not None or args.idle is not None:
        body: dict[str, int | None] = {}  # what is left out keeps its value
        if args.session is not None:
            body["session_cap_micro"] = _cap(args.session)
        if args.day is not None:
            body["day_cap_micro"] = _cap(args.day)
        if args.idle is not None:
            body["idle_limit_s"] = _idle(args.idle)
        caps = client.request("PUT", "/me/caps", body)
    if args.json:
        print(json.dumps(caps))
        return

    def shown(micro: int | None) -> str:
        return "none" if micro is None else f"{format_credits(micro)} credits"

    print(f"per session: {shown(caps['session_cap_micro'])}")
    print(
        f"per day:     {shown(caps['day_cap_micro'])} "
        f"(spent today, UTC: {format_credits(caps['spent_today_micro'])} credits)"
    )
    print(f"warned at {caps['warn_percent']} %, stopped at the cap, by the broker")
    idle = caps.get("idle_limit_s")
    if idle is None:
        idle_text = f"the broker's ({format_duration(int(caps.get('idle_default_s') or 0))})"
    else:
        idle_text = "never stopped" if idle == 0 else format_duration(idle)
    print(f"idle limit:  {idle_text} (no cell running, GPUs unused)")


def cmd_offers(args: argparse.Namespace) -> None:
    offers = _client(args).request("GET", "/offers")
    if args.json:
        print(json.dumps(offers))
        return
    rows = [
        {
            **o,
            "price": f"{format_credits(o['price_per_hour_micro'])}/h",
            "memory": f"{o['gpu_memory_mib']} MiB",
            "network": (o.get("sandbox") or {}).get("network") or "-",
        }
        for o in offers
    ]
    print(
        _table(
            rows,
            [
                ("id", "ID"),
                ("host_id", "HOST"),
                ("gpu_model", "GPU"),
                ("gpu_count", "COUNT"),
                ("memory", "MEMORY"),
                ("price", "PRICE"),
                ("network", "NETWORK"),
                ("state", "STATE"),
            ],
        )
    )


def cmd_sessions(args: argparse.Namespace) -> None:
    client = _client(args)
    sessions = client.request("GET", "/sessions")
    if args.json:
        print(json.dumps(sessions))
        return
    me = client.request("GET", "/me")["name"]
    rows = [
        {
            **s,
            "amount": _money(
                s["amount_micro"] if s["state"] == "ended" else s["cost_so_far_micro"]
            ),
            # "stopped" is the renter's own stop (the lab's, the CLI's, a notebook server's).
            "end_reason": (
                ("stopped by you" if s["renter"] == me else "stopped by the renter")
                if s["end_reason"] == "stopped"
                else s["end_reason"]
            ),
        }
        for s in sessions
    ]
    print(
        _table(
            rows,
            [
                ("id", "ID"),
                ("state", "STATE"),
                ("host_id", "HOST"),
                ("started_at", "STARTED"),
                ("billed_seconds", "SECONDS"),
                ("amount", "CREDITS"),
                ("end_reason", "ENDED BY"),
            ],
        )
    )


def cmd_earnings(args: argparse.Namespace) -> None:
    earnings = _client(args).request("GET", "/earnings")
    if args.json:
        print(json.dumps(earnings))
        return
    score = earnings["reliability"]
    print(
        f"{earnings['host']}: earned {format_credits(earnings['total_micro'])} credits in total; "
        f"reliability {'new host' if score is None else f'{score:.0%}'}"
    )
    rows = [
        {**d, "time": _duration(d["billed_seconds"]), "earned": _money(d["earned_micro"])}
        for d in earnings["days"]
    ]
    print(
        _table(
            rows,
            [("day", "DAY"), ("sessions", "SESSIONS"), ("time", "RENTED"), ("earned", "EARNED")],
        )
    )
    if earnings["sessions"]:
        print()
        rows = [
            {**e, "time": _duration(e["billed_seconds"]), "earned": _money(e["earned_micro"])}
            for e in earnings["sessions"][:20]
        ]
        print(
            _table(
                rows,
                [
                    ("session_id", "SESSION"),
                    ("ended_at", "ENDED"),
                    ("time", "RENTED"),
                    ("earned", "EARNED"),
                ],
            )
        )


def cmd_stop(args: argparse.Namespace) -> None:
    session = _client(args).request("DELETE", f"/sessions/{args.session_id}")
    print(
        f"session {session['id']} {session['state']}: {session['billed_seconds']} s, "
        f"{_money(session['amount_micro'])} credits"
    )


def cmd_sync(args: argparse.Namespace) -> None:
    from .kernel.files import describe
    from .kernel.local_servers import NoServer, bring_back

    try:
        summary = bring_back(args.session_id, server=args.server)
    except NoServer as error:
        raise CommandError(str(error)) from None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(describe(summary))


def _duration(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def cmd_class_list(args: argparse.Namespace) -> None:
    classes = _client(args).request("GET", "/classes")
    if args.json:
        print(json.dumps(classes))
        return
    rows = [
        {
            **c,
            "budget": _money(c["budget_micro"]),
            "quota": _duration(c["quota_seconds"]) or _money(c["quota_micro"]),
        }
        for c in classes
    ]
    print(
        _table(
            rows,
            [
                ("name", "CLASS"),
                ("teacher", "TEACHER"),
                ("your_role", "YOU"),
                ("budget", "BUDGET"),
                ("quota", "QUOTA/STUDENT"),
                ("gpu_model", "GPU"),
            ],
        )
    )


def cmd_class_create(args: argparse.Namespace) -> None:
    from .classes import parse_quota

    body: dict[str, Any] = {"name": args.name}
    try:
        body["quota_seconds"], body["quota_micro"] = parse_quota(args.quota_per_student)
        if args.weekly_quota:
            weekly, _ = parse_quota(args.weekly_quota)
            if weekly is None:
                raise ValueError("--weekly-quota is a duration such as 3h")
            body["weekly_quota_seconds"] = weekly
        if args.budget:
            body["budget_micro"] = parse_positive_credits(args.budget)
        if args.max_price_per_hour:
            body["max_price_per_hour_micro"] = parse_positive_credits(args.max_price_per_hour)
    except ValueError as error:
        raise CommandError(str(error)) from None
    for key, value in (
        ("gpu_model", args.gpu),
        ("starts_at", args.starts),
        ("ends_at", args.ends),
        ("teacher", args.teacher),
    ):
        if value:
            body[key] = value
    created = _client(args).request("POST", "/classes", body)
    print(
        f"class {created['name']} created: "
        f"budget {format_credits(created['budget_micro'])} credits, "
        f"kernel '{created['kernel_name']}'"
    )


def cmd_class_grant(args: argparse.Namespace) -> None:
    try:
        amount = parse_positive_credits(args.amount)
    except ValueError as error:
        raise CommandError(f"AMOUNT {args.amount!r}: {error}") from None
    record = _client(args).request("POST", f"/classes/{args.name}/budget", {"amount_micro": amount})
    print(f"class {record['name']}: budget {format_credits(record['budget_micro'])} credits")


def _students_from(args: argparse.Namespace) -> list[str]:
    import csv

    students = list(args.users)
    if args.csv:
        try:
            with open(args.csv, newline="") as handle:
                for row in csv.reader(handle):
                    if (
                        row
                        and row[0].strip()
                        and row[0].strip().lower() not in ("name", "user", "student")
                    ):
                        students.append(row[0].strip())
        except OSError as error:
            raise CommandError(f"cannot read {args.csv}: {error.strerror}") from None
    if not students:
        raise CommandError("name students, or give --csv FILE")
    return students


def cmd_class_add_students(args: argparse.Namespace) -> None:
    answer = _client(args).request(
        "POST", f"/classes/{args.name}/students", {"students": _students_from(args)}
    )
    print(f"{len(answer['added'])} students in {args.name}")
    if answer["new_accounts"]:
        print("new accounts; give each student their token (shown only once):")
        print("student,token")
        for student, token in answer["new_accounts"].items():
            print(f"{student},{token}")


def cmd_class_remove_student(args: argparse.Namespace) -> None:
    _client(args).request("DELETE", f"/classes/{args.name}/students/{args.student}")
    print(f"{args.student} removed from {args.name}")


def cmd_class_assign(args: argparse.Namespace) -> None:
    from pathlib import Path

    client = _client(args)
    for path in map(Path, args.notebooks):
        try:
            content = json.loads(path.read_text())
        except OSError as error:
            raise CommandError(f"cannot read {path}: {error.strerror}") from None
        except ValueError:
            raise CommandError(f"{path} is not a notebook (not JSON)") from None
        client.request("PUT", f"/classes/{args.name}/notebooks/{path.name}", content)
        print(f"published {path.name} to {args.name}")


def cmd_class_usage(args: argparse.Namespace) -> None:
    usage = _client(args).request("GET", f"/classes/{args.name}/usage")
    if args.json:
        print(json.dumps(usage))
        return
    if usage["budget_micro"] is not None:
        print(
            f"class {usage['class']}: budget left {format_credits(usage['budget_micro'])} credits"
        )
    rows = [
        {
            **u,
            "time": _duration(u["seconds"]),
            "credits": _money(u["credits_micro"]),
            "running": len(u["running"]) or "",
            "left": _duration(u["remaining_seconds"]) or _money(u["remaining_micro"]),
        }
        for u in usage["students"]
    ]
    print(
        _table(
            rows,
            [
                ("student", "STUDENT"),
                ("time", "GPU TIME"),
                ("credits", "CREDITS"),
                ("sessions", "SESSIONS"),
                ("running", "RUNNING"),
                ("left", "QUOTA LEFT"),
            ],
        )
    )


def cmd_class_stop(args: argparse.Namespace) -> None:
    answer = _client(args).request("POST", f"/classes/{args.name}/students/{args.student}/stop")
    stopped = answer["stopped_sessions"]
    print(
        f"stopped {len(stopped)} kernel(s) of {args.student}"
        if stopped
        else f"{args.student} has no running kernel in {args.name}"
    )


def cmd_class_fetch(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .kernel.kernelspecs import install_class_kernelspec

    client = _client(args)
    record = client.request("GET", f"/classes/{args.name}")
    dest = Path(args.dest or ".") / record["name"]
    dest.mkdir(parents=True, exist_ok=True)
    for entry in client.request("GET", f"/classes/{args.name}/notebooks"):
        target = dest / entry["name"]
        if target.exists() and not args.force:
            print(f"kept your {target} (use --force to replace it)")
            continue
        content = client.request("GET", f"/classes/{args.name}/notebooks/{entry['name']}")
        target.write_text(json.dumps(content, indent=1))
        print(f"fetched {target}")
    spec_dir = install_class_kernelspec(
        record["name"], record["kernel_name"], record.get("gpu_model")
    )
    print(f"kernel '{record['kernel_name']}' installed in {spec_dir}")


def _receipt_tools() -> Any:
    """Import the receipt rules only for the verbs that use them (they load cryptography)."""
    from .ledger import receipts

    return receipts


def _load_public_key(path: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as handle:
            key = load_pem_public_key(handle.read())
    except OSError as error:
        raise CommandError(f"cannot read public key {path}: {error.strerror}") from None
    except ValueError:
        raise CommandError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CommandError(f"{path} is not an Ed25519 public key")
    return key


def cmd_receipt(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.public_key:
        if args.session_id:
            raise CommandError("give a session or --public-key, not both")
        print(client.request("GET", "/receipts/public-key")["public_key_pem"], end="")
        return
    if not args.session_id:
        raise CommandError("which session? give its id (or --public-key)")
    receipt = client.request("GET", f"/sessions/{args.session_id}/receipt")
    text = _receipt_tools().canonical_bytes(receipt).decode("utf-8")
    if args.out is None:
        print(text)
        return
    try:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    except OSError as error:
        raise CommandError(f"cannot write {args.out}: {error.strerror}") from None
    print(f"receipt of session {receipt['session_id']} written to {args.out}")


def cmd_verify(args: argparse.Namespace) -> None:
    receipts = _receipt_tools()
    key = _load_public_key(args.public_key)
    try:
        with open(args.file, encoding="utf-8") as handle:
            receipt = json.load(handle)
    except OSError as error:
        raise CommandError(f"cannot read {args.file}: {error.strerror}") from None
    except ValueError as error:
        raise CommandError(f"{args.file} is not a JSON receipt: {error}") from None
    problems = receipts.verify(receipt, key)
    if problems:
        raise CommandError(f"{args.file} is not valid: " + "; ".join(problems))
    print(
        f"valid: session {receipt['session_id']}, {receipt['billed_seconds']} s, "
        f"amount {format_credits(receipt['amount_micro'])} "
        f"(host {format_credits(receipt['host_micro'])}, fee {format_credits(receipt['fee_micro'])}"
        f"), renter {receipt['renter']}, host {receipt['host']}, receipt {receipt['sequence']}, "
        f"key {receipt['key_id']}"
    )


def cmd_admin_audit(args: argparse.Namespace) -> None:
    receipts = _receipt_tools()
    client = _client(args)
    current = client.request("GET", "/receipts/public-key")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = {current["key_id"]: load_pem_public_key(current["public_key_pem"].encode())}
    for path in args.public_key or []:
        key = _load_public_key(path)
        keys[receipts.key_id(key)] = key
    problems: list[str] = []
    runs: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    count = unchecked = 0
    after = 0
    while True:
        page = client.request("GET", f"/receipts?after={after}")
        batch = page["receipts"]
        problems += receipts.chain_problems(batch, previous)
        for receipt in batch:
            key = keys.get(receipt.get("key_id"))
            if key is None:
                unchecked += 1
                continue
            problems += [
                f"receipt {receipt.get('sequence')}: {p}" for p in receipts.verify(receipt, key)
            ]
        for run in receipts.segments(batch):
            if runs and runs[-1]["key_id"] == run["key_id"]:
                runs[-1].update(last=run["last"], count=runs[-1]["count"] + run["count"])
            else:
                runs.append(run)
        count += len(batch)
        if batch:
            previous = batch[-1]
        if page.get("next_after") is None:
            break
        after = page["next_after"]
    ledger = client.request("GET", "/ledger/check")
    problems += ledger["problems"]
    print(f"receipts: {count} in {len(runs)} key segment(s)")
    for run in runs:
        known = "" if run["key_id"] in keys else " (no public key given: signatures not checked)"
        print(
            f"  key {run['key_id']}: receipts {run['first']}-{run['last']} ({run['count']}){known}"
        )
    print(f"signatures checked: {count - unchecked}")
    print(f"ledger: {'balanced' if ledger['ok'] else 'PROBLEMS'}")
    if problems:
        for problem in problems[:50]:
            print(f"problem: {problem}")
        more = " (first 50 shown)" if len(problems) > 50 else ""
        raise CommandError(f"audit found {len(problems)} problem(s){more}")
    print("audit passed")


def _add_class_parser(verbs: Any, common: argparse.ArgumentParser) -> None:
    klass = verbs.add_parser("class", help="classes: budgets, students, notebooks, usage")
    actions = klass.add_subparsers(
        dest="class_verb", metavar="ACTION", required=True, parser_class=OneLineParser
    )
    listing = actions.add_parser("list", parents=[common], help="your classes")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_class_list)
    create = actions.add_parser("create", parents=[common], help="create a class (teacher token)")
    create.add_argument("name")
    create.add_argument(
        "--quota-per-student",
        required=True,
        help="GPU time (2h, 90m) or credits (5) per student for the course",
    )
    create.add_argument(
        "--budget", help="credits moved from your balance to the class (admins: granted)"
    )
    create.add_argument("--weekly-quota", help="GPU time per student per week, e.g. 3h")
    create.add_argument("--gpu", help="only this GPU model")
    create.add_argument("--max-price-per-hour", help="never rent above this price (credits/h)")
    create.add_argument("--starts", help="first day, e.g. 2026-12-01")
    create.add_argument("--ends", help="day after the last, e.g. 2027-03-01")
    create.add_argument("--teacher", help="(admins) the teacher who owns the class")
    create.set_defaults(run=cmd_class_create)
    grant = actions.add_parser(
        "grant",
        parents=[common],
        help="add to a class budget (admin: granted; teacher: from your balance)",
    )
    grant.add_argument("name")
    grant.add_argument("amount", help="credits, a decimal such as 250")
    grant.set_defaults(run=cmd_class_grant)
    add = actions.add_parser("add-students", parents=[common], help="enrol students")
    add.add_argument("name")
    add.add_argument("users", nargs="*")
    add.add_argument("--csv", help="a CSV file whose first column is the user name")
    add.set_defaults(run=cmd_class_add_students)
    remove = actions.add_parser(
        "remove-student", parents=[common], help="take a student off a class"
    )
    remove.add_argument("name")
    remove.add_argument("student")
    remove.set_defaults(run=cmd_class_remove_student)
    assign = actions.add_parser("assign", parents=[common], help="publish starter notebooks")
    assign.add_argument("name")
    assign.add_argument("notebooks", nargs="+")
    assign.set_defaults(run=cmd_class_assign)
    usage = actions.add_parser("usage", parents=[common], help="use per student")
    usage.add_argument("name")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(run=cmd_class_usage)
    stop = actions.add_parser("stop", parents=[common], help="stop a student's running kernel")
    stop.add_argument("name")
    stop.add_argument("student")
    stop.set_defaults(run=cmd_class_stop)
    fetch = actions.add_parser(
        "fetch", parents=[common], help="download a class's notebooks and install its kernel"
    )
    fetch.add_argument("name")
    fetch.add_argument("--dest", help="folder to put NAME/ in (default: here)")
    fetch.add_argument("--force", action="store_true", help="replace notebooks you already have")
    fetch.set_defaults(run=cmd_class_fetch)


def build_parser() -> OneLineParser:
    """The argument parser of the client verbs."""
    parser = OneLineParser(prog=PROG, description="Rent and share GPUs from inside Jupyter.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    common = OneLineParser(add_help=False)
    common.add_argument("--broker", help="broker URL (environment: GPU_SHARE_BROKER_URL)")
    common.add_argument("--token", help="your token (environment: GPU_SHARE_TOKEN)")
    common.add_argument(
        "--ca-file",
        help="a CA certificate (PEM) to trust for the broker's TLS, besides the system's "
        "(environment: GPU_SHARE_CA_FILE)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser)
    for verb, text in (
        ("broker", "run the broker (a Jupyter server extension); --help for its options"),
        ("host", "lend this machine's GPUs through a broker; --help for its options"),
        ("demo", "run a broker, a local host and JupyterLab, ready to try"),
    ):
        verbs.add_parser(verb, help=text, add_help=False)

    admin = verbs.add_parser("admin", help="accounts, tokens and credit (admin token)")
    admin_verbs = admin.add_subparsers(
        dest="admin_verb", metavar="ACTION", required=True, parser_class=OneLineParser
    )
    token = admin_verbs.add_parser(
        "token", parents=[common], help="create an account if needed, print a new token"
    )
    token.add_argument("--role", required=True, choices=["user", "host", "teacher", "admin"])
    token.add_argument("--name", required=True)
    token.add_argument(
        "--expires-in",
        type=token_lifetime,
        metavar="DURATION",
        help="the token stops working after this long: 30s, 12h, 30d, 2w, 1y (default: never)",
    )
    token.set_defaults(run=cmd_admin_token)
    tokens = admin_verbs.add_parser(
        "tokens", parents=[common], help="an account's tokens: id, times, state (no secrets)"
    )
    tokens.add_argument("name")
    tokens.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tokens.set_defaults(run=cmd_admin_tokens)
    revoke = admin_verbs.add_parser(
        "revoke", parents=[common], help="revoke every token of an account, at once"
    )
    revoke.add_argument("name")
    revoke.set_defaults(run=cmd_admin_revoke)
    credit = admin_verbs.add_parser("credit", parents=[common], help="add credits to an account")
    credit.add_argument("name")
    credit.add_argument("amount", help="credits, a decimal such as 12.5")
    credit.set_defaults(run=cmd_admin_credit)
    audit = admin_verbs.add_parser(
        "audit",
        parents=[common],
        help="check every receipt's signature, the receipt chain and the ledger",
    )
    audit.add_argument(
        "--public-key",
        action="append",
        metavar="PEM_FILE",
        help="a former receipt key, to check the receipts it signed (may be repeated)",
    )
    audit.set_defaults(run=cmd_admin_audit)

    for verb, run, text in (
        ("balance", cmd_balance, "your balance (a host: its earnings)"),
        ("offers", cmd_offers, "GPU offers of the hosts online now"),
        ("sessions", cmd_sessions, "your sessions and what they cost"),
        ("earnings", cmd_earnings, "a host's earnings per day and session, and its reliability"),
    ):
        sub = verbs.add_parser(verb, parents=[common], help=text)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.set_defaults(run=run)
    _add_class_parser(verbs, common)
    stop = verbs.add_parser("stop", parents=[common], help="stop one of your sessions now")
    stop.add_argument("session_id")
    stop.set_defaults(run=cmd_stop)
    caps = verbs.add_parser(
        "caps",
        parents=[common],
        help="your spending caps per session and per day (the broker stops your kernels at "
        "them, and warns at 80 %%)",
    )
    caps.add_argument("--session", metavar="CREDITS", help="cap per session, or 'none'")
    caps.add_argument("--day", metavar="CREDITS", help="cap per day (UTC), or 'none'")
    caps.add_argument(
        "--idle",
        metavar="DURATION",
        help="stop your kernels idle this long (30m, 2h; 'never'; 'default': the broker's)",
    )
    caps.add_argument("--json", action="store_true", help="print JSON instead of lines")
    caps.set_defaults(run=cmd_caps)
    sync = verbs.add_parser(
        "sync",
        help="bring back what a remote kernel wrote in its working folder, into the "
        "notebook's folder (through the Jupyter server that started it)",
    )
    sync.add_argument("session_id", metavar="SESSION")
    sync.add_argument(
        "--server",
        metavar="URL",
        help="that server's URL with ?token=... (default: each one running here)",
    )
    sync.add_argument("--json", action="store_true", help="print JSON instead of a line")
    sync.set_defaults(run=cmd_sync)
    receipt = verbs.add_parser(
        "receipt", parents=[common], help="a session's signed receipt, or the broker's public key"
    )
    receipt.add_argument("session_id", nargs="?")
    receipt.add_argument("--out", metavar="FILE", help="write the receipt to FILE")
    receipt.add_argument(
        "--public-key", action="store_true", help="print the PEM of the key that signs receipts"
    )
    receipt.set_defaults(run=cmd_receipt)
    verify = verbs.add_parser("verify", help="check a receipt offline against a public key")
    verify.add_argument("file", metavar="FILE")
    verify.add_argument("--public-key", required=True, metavar="PEM_FILE")
    verify.set_defaults(run=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``jupyter gpu-share`` verb."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in SERVER_VERBS:
        return _run_server_verb(args_list[0], args_list[1:])
    parser = build_parser()
    args = parser.parse_args(join_token_values(args_list))
    if args.version:
        from ._version import __version__

        print(__version__)
        return 0
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except (BrokerError, CommandError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


def join_token_values(argv: list[str]) -> list[str]:
    """Write ``--token VALUE`` as ``--token=VALUE``: argparse takes an older token that begins
    with "-" for an option, and the README's ``--token <token>`` form must keep working."""
    joined: list[str] = []
    values = iter(argv)
    for arg in values:
        if arg == "--token":
            value = next(values, None)
            joined.append(arg if value is None else f"--token={value}")
        elif arg == "--":
            joined.extend([arg, *values])
        else:
            joined.append(arg)
    return joined


def _run_server_verb(verb: str, argv: list[str]) -> int:
    if verb == "broker":
        from .broker.app import BrokerApp
        from .loops import EventLoopError

        try:
            BrokerApp.launch_instance(argv)
        except EventLoopError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 1
    elif verb == "host":
        from .host.app import HostAgentApp

        HostAgentApp.launch_instance(argv)
    else:
        from .demo import run_demo

        return run_demo(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
