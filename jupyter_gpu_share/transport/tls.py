"""TLS for every client of the broker: the host agent, the user side, the CLI.

Certificates and host names are verified by default, against the system's CAs plus, when
given, a CA of the deployment's own (``ca_file``, ``--ca-file`` or ``GPU_SHARE_CA_FILE``):
unlike ``SSL_CERT_FILE``, it adds to the system bundle instead of replacing it. A host agent
may present a client certificate to a broker (or a TLS proxy) that asks for one.

A failed handshake is said in one line that names the broker, what was wrong with its
certificate, and what to do about it.
"""

from __future__ import annotations

import os
import ssl
from functools import lru_cache
from urllib.parse import urlsplit

CA_FILE_ENV = "GPU_SHARE_CA_FILE"


class TLSConfigError(ValueError):
    """A CA file or client certificate that cannot be used; the message is for people."""


def ca_file_from(value: str | None = None) -> str | None:
    """The CA file to trust besides the system's: ``value``, else ``GPU_SHARE_CA_FILE``."""
    return value or os.environ.get(CA_FILE_ENV) or None


@lru_cache(maxsize=16)
def _context(ca_file: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()  # system CAs, CERT_REQUIRED, host names checked
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise TLSConfigError(f"cannot use the CA file {ca_file}: {_reason(error)}") from None
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile or None)
        except (OSError, ssl.SSLError) as error:
            raise TLSConfigError(
                f"cannot use the client certificate {certfile}: {_reason(error)}"
            ) from None
    return context


def client_context(
    ca_file: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """A verifying TLS context for connections to the broker (one per set of files)."""
    return _context(ca_file_from(ca_file), certfile or None, keyfile or None)


def context_for(
    url: str, ca_file: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext | None:
    """The TLS context for ``url`` (https or wss), None for plain http or ws."""
    if urlsplit(url).scheme not in ("https", "wss"):
        return None
    return client_context(ca_file, certfile, keyfile)


def _reason(error: BaseException) -> str:
    """What went wrong, in the words of the ssl module or the OS."""
    for name in ("verify_message", "reason", "strerror"):
        text = getattr(error, name, None)
        if text:
            return str(text)
    return str(error)


def describe(error: BaseException, url: str) -> str | None:
    """One line on a TLS failure reaching ``url`` (None: ``error`` is not about TLS)."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
        if not isinstance(cause, BaseException):
            cause = None
    if cause is None:
        return None
    host = urlsplit(url).netloc or url
    if isinstance(cause, ssl.SSLCertVerificationError):
        what = cause.verify_message or str(cause)
        if cause.verify_code in (18, 19, 20, 21):  # self-signed, or an unknown issuer
            hint = f"if it uses a CA of its own, pass --ca-file CA.pem (or set {CA_FILE_ENV})"
        elif cause.verify_code == 10:
            hint = "the broker's certificate must be renewed"
        elif cause.verify_code in (62, 64) or "mismatch" in what.lower():
            hint = "connect by a name the certificate holds, or reissue it for this name"
        else:
            hint = "check the broker's certificate"
        return f"the TLS certificate of {host} was refused ({what}): {hint}"
    return f"TLS with {host} failed ({cause.reason or cause}): is it serving https on that port?"
