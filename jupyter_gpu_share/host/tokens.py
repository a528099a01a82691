"""Where the host agent's secrets come from: a file only its user can read, or the environment.

A token on the command line is in ``/proc/PID/cmdline``, which ``ps`` shows to every local
user; a token file (mode 0600) or an environment variable is not. ``--token`` still works,
with a warning (:func:`argv_warning`).
"""

from __future__ import annotations

import os
import stat

MAX_TOKEN_FILE_BYTES = 4096  # a token is under 100 bytes; anything much larger is a mistake


class TokenFileError(ValueError):
    """A token file that is missing, unsafe (group or others may read it) or empty."""


def read_token_file(path: str, what: str = "token") -> str:
    """Read a secret from ``path``: a regular file that only its owner may read or write."""
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not hang the agent's start.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise TokenFileError(f"{what} file {path}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)  # of the file opened, not of whatever the path names later
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"{what} file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise TokenFileError(
                f"{what} file {path} can be read or written by other users (mode {mode:04o}): "
                f"run chmod 600 {path}"
            )
        data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
    except OSError as err:
        raise TokenFileError(f"{what} file {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise TokenFileError(
            f"{what} file {path} is over {MAX_TOKEN_FILE_BYTES} bytes: it holds the token only"
        )
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"{what} file {path} is not UTF-8 text") from None
    if not token:
        raise TokenFileError(f"{what} file {path} is empty")
    if any(c.isspace() for c in token):
        raise TokenFileError(f"{what} file {path} holds more than one word: the token only")
    return token


def argv_warning(option: str, file_option: str, env: str) -> str:
    """The warning for a secret given on the command line."""
    return (
        f"{option} puts a secret on the command line, where `ps` shows it to every local "
        f"user: use {file_option} PATH (a file of mode 0600) or the {env} environment "
        "variable instead"
    )
