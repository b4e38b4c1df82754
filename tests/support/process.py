"""The bridge as a real process: ``python -m dmbridge run``, killed and restarted by tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

import aiohttp

# Both must answer 200: health once the API listens, readiness once the homeserver accepts the
# bridge (the bot is registered and the homeserver pinged it), which comes a little later.
READY_PATHS = ("/_dmbridge/v1/health", "/_dmbridge/v1/health/ready")
# The process runs and its API listens, whether or not the homeserver is there.
LIVE_PATHS = ("/_dmbridge/v1/health",)


class BridgeProcess:
    """One bridge subprocess; ``start()`` again after ``kill()``/``terminate()`` to restart.

    As a context manager (``with`` or ``async with``) it does not start the bridge, but kills it
    on exit if it is still running.
    """

    def __init__(self, config_path: Path, log_path: Path, *,
                 env: Mapping[str, str] | None = None, nofile: int | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = dict(env or {})  # on top of os.environ, e.g. DMBRIDGE_* overrides
        self.nofile = nofile  # the child's RLIMIT_NOFILE (soft and hard), if given
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> None:
        if self.running:
            raise AssertionError(f"the bridge is already running (pid {self.pid})")
        self._close_log()
        self.starts += 1
        self._log = open(self.log_path, "ab")  # closed once the process has ended
        # A marker, so a restarted bridge's log can be told from the previous run's.
        self._log.write(f"=== BridgeProcess start #{self.starts} ===\n".encode())
        self._log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dmbridge", "run", "-c", str(self.config_path)],
            cwd=self.config_path.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self._limit if self.nofile is not None else None,
        )

    def _limit(self) -> None:
        """In the child, before exec: its file-descriptor limit."""
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def open_fds(self) -> list[str]:
        """What the running bridge's file descriptors point at (sockets, files)."""
        folder = Path(f"/proc/{self.pid}/fd")
        targets = []
        for fd in folder.iterdir():
            with contextlib.suppress(OSError):
                targets.append(os.readlink(fd))
        return targets

    async def wait_ready(self, port: int, timeout: float = 60.0,
                         paths: tuple[str, ...] = READY_PATHS) -> None:
        """Until every one of ``paths`` answers 200; fails early if the process exits."""
        if self._proc is None:
            raise AssertionError("the bridge was never started")
        deadline = time.monotonic() + timeout
        pending = list(paths)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while pending:
                code = self._proc.poll()
                if code is not None:
                    raise AssertionError(
                        f"the bridge exited with code {code} during start-up:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"http://127.0.0.1:{port}{pending[0]}") as resp:
                        if resp.status == 200:
                            pending.pop(0)
                            continue
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the bridge did not answer 200 on {pending[0]} (port {port}) within "
                        f"{timeout} s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    async def kill(self) -> int:
        """SIGKILL, as a crash would; returns the exit code (-9 if it was still running)."""
        self._signal(signal.SIGKILL)
        return await self._wait(timeout=10.0)

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM for a clean stop; SIGKILL if it has not exited after ``timeout`` s."""
        self._signal(signal.SIGTERM)
        try:
            return await self._wait(timeout)
        except TimeoutError:
            return await self.kill()

    def _signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self._proc is not None
            # By pid, never by name: other bridges (other tests, the developer's) may be running.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    async def _wait(self, timeout: float) -> int:
        # In a thread, not Popen.wait() on the loop: the bridge may need this event loop while
        # it stops (a webhook receiver or fake homeserver served from the test's own loop).
        if self._proc is None:
            raise AssertionError("the bridge was never started")
        try:
            code = await asyncio.to_thread(self._proc.wait, timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the bridge (pid {self.pid}) runs after {timeout} s") from None
        self._close_log()
        return code

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(lines[-n:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _kill_now(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._signal(signal.SIGKILL)
            self._proc.wait(10.0)  # SIGKILL needs no cooperation, so blocking is brief
        self._close_log()

    def __enter__(self) -> BridgeProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._kill_now()

    async def __aenter__(self) -> BridgeProcess:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.running:
            await self.kill()
        self._close_log()
