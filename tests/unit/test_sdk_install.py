"""The SDK installs and imports in a virtualenv holding only aiohttp, not the bridge."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# aiohttp and what it needs, as requirements.lock pins and hashes them.
AIOHTTP = {"aiohttp", "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "multidict",
           "propcache", "yarl", "idna", "typing-extensions"}

CHECK = """
import importlib.util, pathlib, sys
import dmbridge_client
from dmbridge_client import Client, Router
for server_part in ("dmbridge", "mautrix", "asyncpg", "ruamel"):
    assert importlib.util.find_spec(server_part) is None, server_part
assert (pathlib.Path(dmbridge_client.__file__).parent / "py.typed").exists()
client = Client("http://127.0.0.1:1", "token", "sms", remote_id_pattern="[0-9]+")
client.webhook_app("secret")
print("imported", dmbridge_client.__name__, "from", dmbridge_client.__file__)
"""


def _locked(names: set[str]) -> str:
    """The lock's entries (pin and hashes) for these packages."""
    text = (ROOT / "requirements.lock").read_text()
    entries = {m.group(1): m.group(0) for m in re.finditer(
        r"^([a-z0-9._-]+)==\S+ \\\n(?:\s+--hash=\S+(?: \\)?\n)+", text, re.MULTILINE)}
    assert names <= set(entries), names - set(entries)
    return "".join(entries[name] for name in sorted(names))


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _both(first: list[str | Path], second: list[str | Path]) -> None:
    """Two commands side by side (each mostly waits on downloads or the pip cache)."""
    procs = [subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for args in (first, second)]
    for args, proc in zip((first, second), procs, strict=True):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{args}:\n{out}"


def test_the_sdk_installs_with_only_aiohttp_and_imports(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet")
    source = tmp_path / "sdk"  # a copy: building writes beside the sources
    shutil.copytree(ROOT / "sdk", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    requirements = tmp_path / "aiohttp.txt"
    requirements.write_text(_locked(AIOHTTP))
    _both([*pip, "--python", python, "install", "--no-deps", "--require-hashes", "-r",
           requirements],
          [*pip, "wheel", "--no-deps", "--wheel-dir", tmp_path / "wheels", source])
    wheel = next((tmp_path / "wheels").glob("dmbridge_client-*.whl"))
    _run(*pip, "--python", python, "install", "--no-deps", wheel)

    out = _run(python, "-c", CHECK, cwd=tmp_path)  # not from the repository's folder
    assert f"from {venv}" in out, out
    installed = _run(python, "-c", "import importlib.metadata as m\n"
                     "for d in m.distributions(): print(d.metadata['Name'])", cwd=tmp_path)
    names = {line.lower().replace("_", "-") for line in installed.split()}
    assert names == AIOHTTP | {"dmbridge-client"}, names
