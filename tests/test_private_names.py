"""No module of the transport (the transport package, the websocket ends of the broker,
the bridge and the host agent, the ZMQ pumps) or of the store touches a private name of
tornado, jupyter_server, jupyter_client or SQLAlchemy (issue 16): a minor release of any of
them may change those without a word."""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

LIBRARIES = ("tornado", "jupyter_server", "jupyter_client", "sqlalchemy")
# Public names that begin with "_" so as not to clash with column names: SQLAlchemy's Row
# (Row._mapping, Row._asdict, Row._fields, Row._t, Row._tuple), as namedtuple's do.
DOCUMENTED = frozenset({"_mapping", "_asdict", "_fields", "_t", "_tuple", "_replace"})
PACKAGE = Path(__file__).resolve().parents[1] / "jupyter_gpu_share"
ENDS = ["broker/handlers.py", "broker/relay.py", "kernel/bridge.py", "host/agent.py"]
ENDS += ["host/kernels.py", "zmqpump.py", "wire.py"]
CHECKED = sorted(
    [
        *(PACKAGE / "transport").glob("*.py"),
        *(PACKAGE / "store").glob("*.py"),
        *(PACKAGE / name for name in ENDS),
    ]
)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@functools.lru_cache(maxsize=1)
def library_privates() -> frozenset[str]:
    """Private attribute and method names the libraries define on their objects."""
    names: set[str] = set()
    pattern = re.compile(r"(?:def |self\.)(_[a-zA-Z]\w*)")
    for library in LIBRARIES:
        root = Path(importlib.import_module(library).__file__ or "").parent
        for path in root.rglob("*.py"):
            names.update(pattern.findall(path.read_text(errors="replace")))
    return frozenset(names - DOCUMENTED)


def private_uses(source: str) -> list[str]:
    """Private names of the libraries a module imports, reads off what it imported, or
    reads off any object but itself (``self.stream._read_buffer``)."""
    tree = ast.parse(source)
    bound: set[str] = set()  # local names for the libraries' modules and objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    bound.add((alias.asname or alias.name).split(".")[0])
                    if any(map(_private, alias.name.split("."))):
                        found.append(f"import {alias.name}")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in LIBRARIES
        ):
            if any(map(_private, node.module.split("."))):
                found.append(f"from {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"from {node.module} import {alias.name}")
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{root.id}...{node.attr}")
            elif (
                not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and node.attr in library_privates()
            ):
                found.append(f"..{node.attr}")
    return found


def test_the_checker_finds_what_the_old_transport_did():
    sample = (
        "from tornado import httpclient\nfrom tornado.util import _websocket_mask\n"
        "import tornado.iostream\nx = httpclient._RequestProxy\n"
        "y = tornado.iostream.IOStream._read_buffer\nz = httpclient.HTTPRequest\n"
        "def f(handler):\n    return handler.stream._read_buffer, handler._own\n"
    )
    assert private_uses(sample) == [
        "from tornado.util import _websocket_mask",
        "httpclient..._RequestProxy",
        "tornado..._read_buffer",
        ".._read_buffer",
    ]


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_private_name_of_a_library(path: Path):
    assert private_uses(path.read_text()) == []
