"""After a failed start, a thread a library left behind does not keep the process alive."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import threading, time
from dmbridge.__main__ import _exit_if_stuck
threading.Thread(target=time.sleep, args=(600,), name="left-behind").start()
_exit_if_stuck(1)
print("not reached")
"""


def test_a_thread_left_running_does_not_keep_a_failed_start_alive() -> None:
    # The timeout is the test: without the exit, the process would sleep for 10 minutes.
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stderr
    assert "not reached" not in done.stdout
