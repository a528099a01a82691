"""``jupyter gpu-share <verb>``: the command line of brokers, hosts, renters and admins."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .client import BrokerClient, BrokerError
from .ledger import format_credits, parse_positive_credits

PROG = "jupyter gpu-share"
SERVER_VERBS = ("broker", "host", "demo")


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
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _money(value: int | None) -> str | None:
    return None if value is None else format_credits(value)


def _client(args: argparse.Namespace) -> BrokerClient:
    return BrokerClient(args.broker, args.token)


def cmd_admin_token(args: argparse.Namespace) -> None:
    client = _client(args)
    account = client.request("POST", "/accounts", {"name": args.name, "role": args.role})
    issued = client.request("POST", f"/accounts/{account['name']}/tokens")
    print(f"token for {issued['name']} ({issued['role']}); it is shown only once:")
    print(issued["token"])


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
                ("state", "STATE"),
            ],
        )
    )


def cmd_sessions(args: argparse.Namespace) -> None:
    sessions = _client(args).request("GET", "/sessions")
    if args.json:
        print(json.dumps(sessions))
        return
    rows = [
        {
            **s,
            "amount": _money(
                s["amount_micro"] if s["state"] == "ended" else s["cost_so_far_micro"]
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


def cmd_stop(args: argparse.Namespace) -> None:
    session = _client(args).request("DELETE", f"/sessions/{args.session_id}")
    print(
        f"session {session['id']} {session['state']}: {session['billed_seconds']} s, "
        f"{_money(session['amount_micro'])} credits"
    )


def build_parser() -> OneLineParser:
    """The argument parser of the client verbs."""
    parser = OneLineParser(prog=PROG, description="Rent and share GPUs from inside Jupyter.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    common = OneLineParser(add_help=False)
    common.add_argument("--broker", help="broker URL (environment: GPU_SHARE_BROKER_URL)")
    common.add_argument("--token", help="your token (environment: GPU_SHARE_TOKEN)")
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
    token.set_defaults(run=cmd_admin_token)
    credit = admin_verbs.add_parser("credit", parents=[common], help="add credits to an account")
    credit.add_argument("name")
    credit.add_argument("amount", help="credits, a decimal such as 12.5")
    credit.set_defaults(run=cmd_admin_credit)

    for verb, run, text in (
        ("balance", cmd_balance, "your balance (a host: its earnings)"),
        ("offers", cmd_offers, "GPU offers of the hosts online now"),
        ("sessions", cmd_sessions, "your sessions and what they cost"),
    ):
        sub = verbs.add_parser(verb, parents=[common], help=text)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.set_defaults(run=run)
    stop = verbs.add_parser("stop", parents=[common], help="stop one of your sessions now")
    stop.add_argument("session_id")
    stop.set_defaults(run=cmd_stop)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``jupyter gpu-share`` verb."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in SERVER_VERBS:
        return _run_server_verb(args_list[0], args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
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


def _run_server_verb(verb: str, argv: list[str]) -> int:
    if verb == "broker":
        from .broker.app import BrokerApp

        BrokerApp.launch_instance(argv)
    elif verb == "host":
        from .host.app import HostAgentApp

        HostAgentApp.launch_instance(argv)
    else:
        from .demo import run_demo

        return run_demo(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
