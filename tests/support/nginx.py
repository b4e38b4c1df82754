"""nginx (Debian's package) as the workers' load balancer, with contrib/nginx/dmbridge.conf.

The fixture's nginx runs in the foreground as the test's child, on 127.0.0.1, with its config,
pid file, logs and temporary folders in a folder of its own, and is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

NGINX = Path("/usr/sbin/nginx")
CONFIG = Path(__file__).resolve().parents[2] / "contrib" / "nginx" / "dmbridge.conf"

_SERVER = re.compile(r"^(\s*server )127\.0\.0\.1:\d+( .*)$", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*listen )127\.0\.0\.1:\d+;$", re.MULTILINE)
_ACCESS_LOG = re.compile(r"^(\s*access_log )\S+( dmbridge;)$", re.MULTILINE)
_UPSTREAM = re.compile(r' upstream="([^"]*)" ')
_TEMP = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render(template: str, listen_port: int, worker_ports: list[int], access_log: Path) -> str:
    """The shipped configuration with the balancer's and the workers' ports of this run, and
    its access log in the run's folder."""
    servers = list(_SERVER.finditer(template))
    if (not servers or len(_LISTEN.findall(template)) != 1
            or len(_ACCESS_LOG.findall(template)) != 1):
        raise AssertionError("contrib/nginx/dmbridge.conf: no upstream servers, listen line or"
                             " access_log line")
    template = _ACCESS_LOG.sub(lambda m: f"{m[1]}{access_log}{m[2]}", template)
    servers = list(_SERVER.finditer(template))
    first = servers[0]
    lines = "\n".join(f"{first[1]}127.0.0.1:{port}{first[2]}" for port in worker_ports)
    text = template[:first.start()] + lines + template[servers[-1].end():]
    return _LISTEN.sub(lambda m: f"{m[1]}127.0.0.1:{listen_port};", text)


class Nginx:
    """``start()``; requests then reach the workers at ``http://127.0.0.1:<listen_port>``."""

    def __init__(self, folder: Path, listen_port: int, worker_ports: list[int]) -> None:
        self.folder = folder
        self.listen_port = listen_port
        self.worker_ports = worker_ports
        self.pid_file = folder / "nginx.pid"
        self.error_log = folder / "error.log"
        self.access_log = folder / "access.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The master process's (its workers are its children)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def _write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        site = self.folder / "dmbridge.conf"
        site.write_text(render(CONFIG.read_text(), self.listen_port, self.worker_ports,
                               self.access_log))
        temp = []
        for name in _TEMP:
            (self.folder / "temp" / name).mkdir(parents=True, exist_ok=True)
            temp.append(f"    {name}_temp_path {self.folder / 'temp' / name};")
        # As root, nginx's worker would drop to "nobody", who cannot reach the test's folder.
        user = "user root;\n" if os.geteuid() == 0 else ""
        main = self.folder / "nginx.conf"
        main.write_text(
            f"{user}daemon off;\nworker_processes 1;\nworker_shutdown_timeout 5s;\n"
            f"pid {self.pid_file};\n"
            f"error_log {self.error_log} info;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            + "\n".join(temp) + "\n"
            f"    include {site};\n"
            "}\n")
        return main

    def _spawn(self) -> subprocess.Popen[bytes]:
        main = self._write_config()
        return subprocess.Popen(
            [str(NGINX), "-p", str(self.folder), "-e", str(self.error_log), "-c", str(main)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def start(self, timeout: float = 20.0) -> None:
        """Until nginx accepts connections; fails early if it exits."""
        self._proc = self._spawn()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self._proc.returncode}:\n"
                                     f"{self.log_tail()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.listen_port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx did not listen within {timeout} s:\n"
                                     f"{self.log_tail()}")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        """SIGQUIT (finish the requests in flight), SIGKILL to the master and its workers if it
        has not ended in 10 s (killed alone, the master would leave its workers on the port)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        os.kill(self._proc.pid, signal.SIGQUIT)
        try:
            self._proc.wait(10.0)
        except subprocess.TimeoutExpired:
            workers = children(self._proc.pid)
            os.kill(self._proc.pid, signal.SIGKILL)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._proc.wait(10.0)

    def upstreams(self) -> list[str]:
        """The workers (host:port) named in the access log, one per attempt at a request."""
        addresses: list[str] = []
        for line in self.access_log.read_text().splitlines():
            found = _UPSTREAM.search(line)
            if found is None:
                raise AssertionError(f"nginx's access log: no upstream in {line!r}")
            addresses.extend(a.strip() for a in found[1].split(","))
        return addresses

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no error log)"

    async def __aenter__(self) -> Nginx:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.stop()


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (nginx's workers), as Linux lists them."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]
