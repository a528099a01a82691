"""nginx as a TLS-terminating proxy in front of a broker, as the README deploys it.

Started in the foreground with a configuration written for the test (its own prefix, pid
file and logs); websockets are passed through (``Upgrade``), bodies are not buffered, idle
connections live an hour. :data:`SERVER_BLOCK` is the README's configuration.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

SERVER_BLOCK = """\
map $http_upgrade $connection_upgrade {{
    default upgrade;
    ''      close;
}}
server {{
    listen {listen} ssl;
    ssl_certificate     {cert};
    ssl_certificate_key {key};
    location /gpu-share/ {{
        proxy_pass http://{upstream};
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;       # websockets: the relay, hosts
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $host;
        proxy_buffering off;                          # kernel output as it comes
        proxy_read_timeout 1h;                        # a relay is quiet while a cell runs
        proxy_send_timeout 1h;
        client_max_body_size 17m;                     # the broker's largest body
    }}
}}
"""

MAIN = """\
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{server}
}}
"""


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


DEPLOYED = Path(__file__).parents[1] / "server_extension" / "deploy" / "nginx-brokers.conf"


def deployed_example(
    upstreams: list[str], own: dict[int, str], listen: str, cert: Path, key: Path
) -> str:
    """``server_extension/deploy/nginx-brokers.conf`` with the test's addresses and
    certificate in place of the example's: ``upstreams`` (HOST:PORT) behind the service's
    address, ``own`` each broker behind a port of its own (on the listen address's host)."""
    text = DEPLOYED.read_text()
    options = re.findall(r"^    server \S+ (.*);$", text, flags=re.M)
    assert options, "the example names no upstream server"
    text = re.sub(r"^    server \S+ .*;\n", "", text, flags=re.M)
    lines = "".join(f"    server {u} {options[0]};\n" for u in upstreams)
    text = text.replace("upstream gpu_share_brokers {\n", "upstream gpu_share_brokers {\n" + lines)
    text = re.sub(r"^    \d+ +\S+;\n", "", text, flags=re.M)  # the map of ports to brokers
    ports = "".join(f"    {port} {upstream};\n" for port, upstream in own.items())
    text = text.replace(
        "map $server_port $gpu_share_broker {\n", "map $server_port $gpu_share_broker {\n" + ports
    )
    host = listen.rsplit(":", 1)[0]
    text = re.sub(r"^    listen \d+ ssl;.*\n", "", text, flags=re.M)
    listens = f"    listen {listen} ssl;\n" + "".join(f"    listen {host}:{p} ssl;\n" for p in own)
    text = text.replace("server {\n", "server {\n" + listens, 1)
    text = re.sub(r"ssl_certificate +\S+;", f"ssl_certificate {cert};", text)
    text = re.sub(r"ssl_certificate_key +\S+;", f"ssl_certificate_key {key};", text)
    return text


class Nginx:
    """``nginx`` serving TLS on ``port`` and proxying to ``upstream`` (HOST:PORT), or, with
    ``upstreams``, the deployed example in front of several brokers."""

    def __init__(
        self,
        folder: Path,
        upstream: str,
        cert: Path,
        key: Path,
        upstreams: list[str] | None = None,
        own: dict[int, str] | None = None,
    ) -> None:
        binary = nginx_path()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
        folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        listen = f"127.0.0.1:{self.port}"
        if upstreams:
            server = deployed_example(upstreams, own or {}, listen, cert, key)
        else:
            server = SERVER_BLOCK.format(listen=listen, cert=cert, key=key, upstream=upstream)
        config = folder / "nginx.conf"
        config.write_text(MAIN.format(folder=folder, server=server))
        self.error_log = folder / "error.log"
        self.process = subprocess.Popen(
            [binary, "-p", str(folder), "-c", str(config), "-e", str(self.error_log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen within 20 s")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
