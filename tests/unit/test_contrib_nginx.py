"""The nginx configuration in the README is the one the workers' test runs."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.nginx import CONFIG, render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_contrib_nginx_dmbridge_conf_as_it_is() -> None:
    blocks = re.findall(r"^```nginx\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks == [CONFIG.read_text()]


def test_the_test_runs_the_shipped_configuration_with_its_own_ports() -> None:
    rendered = render(CONFIG.read_text(), 40000, [40001, 40002])
    shipped = CONFIG.read_text().splitlines()
    changed = [line for line in rendered.splitlines() if line not in shipped]
    assert changed == ["    server 127.0.0.1:40001 max_fails=1 fail_timeout=10s;",
                       "    server 127.0.0.1:40002 max_fails=1 fail_timeout=10s;",
                       "    listen 127.0.0.1:40000;"]
    assert [line for line in shipped if line not in rendered.splitlines()] == [
        "    server 127.0.0.1:29341 max_fails=1 fail_timeout=10s;",
        "    server 127.0.0.1:29342 max_fails=1 fail_timeout=10s;",
        "    server 127.0.0.1:29343 max_fails=1 fail_timeout=10s;",
        "    listen 127.0.0.1:29340;"]
