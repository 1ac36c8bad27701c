"""A real nginx in front of the service, configured from deploy/nginx.conf.template."""

from __future__ import annotations

import shutil
import socket
import string
import subprocess
from collections.abc import Callable
from pathlib import Path

from .processes import free_port, terminate
from .waiting import eventually_sync

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf.template"

MAIN_CONF = """
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{}}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/streamer.conf;
}}
"""


def proxy_site(directives: str = "") -> str:
    """A site passing everything to the service, with `directives` beside proxy_pass."""
    return _SITE.replace("        @DIRECTIVES@\n", directives)


_SITE = """
upstream streamer {
    server ${STREAMER_UPSTREAM};
}
server {
    listen ${NGINX_PORT};
    access_log ${NGINX_ACCESS_LOG};
    location / {
        proxy_pass http://streamer;
        @DIRECTIVES@
    }
}
"""

# Nothing but proxy_pass: nginx then speaks HTTP/1.0 to the service (no chunked
# coding), and buffers responses unless they say otherwise.
BARE_SITE = proxy_site()

# A proxy that buffers whole responses and ignores X-Accel-Buffering (and compresses,
# which holds a stream's bytes until a compressed block is full); upgrades do not pass.
BUFFERING_SITE = proxy_site(
    """        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_buffering on;
        proxy_ignore_headers X-Accel-Buffering;
        proxy_buffer_size 64k;
        proxy_buffers 16 256k;
        proxy_busy_buffers_size 512k;
        proxy_read_timeout 1h;
        # Compressing proxies hold a stream's bytes until a compressed block is full.
        gzip on;
        gzip_proxied any;
        gzip_min_length 0;
        gzip_types text/event-stream application/json;
        gzip_buffers 16 64k;
"""
)


class Nginx:
    def __init__(
        self,
        directory: Path,
        upstream_port: int,
        *,
        template: str | None = None,
        edit: Callable[[str], str] | None = None,
    ) -> None:
        """`template` replaces the shipped site configuration; `edit` rewrites the
        rendered one (a proxy that differs from the shipped one)."""
        self.directory = directory
        self.template = template
        self.edit = edit
        self.port = free_port()
        self.upstream_port = upstream_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.directory / "streamer-access.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise AssertionError("nginx is not installed: .ci/run installs it")
        template = TEMPLATE.read_text() if self.template is None else self.template
        site = string.Template(template).safe_substitute(
            STREAMER_UPSTREAM=f"127.0.0.1:{self.upstream_port}",
            NGINX_PORT=f"127.0.0.1:{self.port}",
            NGINX_ACCESS_LOG=str(self.access_log),
        )
        if self.edit is not None:
            site = self.edit(site)
        (self.directory / "streamer.conf").write_text(site)
        conf = self.directory / "nginx.conf"
        conf.write_text(MAIN_CONF.format(dir=self.directory))
        self.process = subprocess.Popen(
            [binary, "-p", str(self.directory), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            eventually_sync(self._listening, what=f"nginx on port {self.port}", timeout=10)
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            assert self.process.stderr is not None
            raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
