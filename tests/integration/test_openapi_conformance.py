"""Schemathesis over the OpenAPI document a running bridge serves: whatever a platform sends,
the answer is documented (status, content type, body schema, headers) and never a 5xx.

One database (SQLite): the run is about the API's contract; the database-specific inputs have
their own tests (test_hostile_input.py). Bounded and derandomised: about a minute here.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
import schemathesis.engine
from schemathesis.engine import Status, events

from dmbridge.bridge import Bridge
from tests.integration.conftest import Homeserver
from tests.support.settings import SMS_TOKEN

MAX_EXAMPLES = 25  # fuzzed cases per operation; derandomised, so every run is the same
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "unsupported_method")


@pytest.fixture(scope="module")
def served_api(homeserver: Homeserver, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:
    """A bridge on its own event loop in a thread, so schemathesis's blocking client can call
    it from the test's thread; yields the API's base URL."""
    folder = tmp_path_factory.mktemp("conformance")
    settings = homeserver.settings(f"sqlite:///{folder / 'dmbridge.db'}", folder / "bridge",
                                   networks={"sms": {
                                       # The examples write to @alice:example.org, which this
                                       # homeserver (no federation) cannot reach: refused up front.
                                       "permissions": {"send_to": ["localhost"]}}},
                                   **{"delivery.pull_max_wait": 1})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bridge-loop", daemon=True)
    thread.start()

    async def start() -> Bridge:
        bridge = Bridge(settings)
        await bridge.start()
        return bridge

    bridge = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
    try:
        yield f"http://127.0.0.1:{homeserver.bridge_port}/_dmbridge/v1"
    finally:
        asyncio.run_coroutine_threadsafe(bridge.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(scope="module")
def api_schema(served_api: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict({
        "seed": 20261202,
        "base-url": served_api,
        "headers": {"Authorization": f"Bearer {SMS_TOKEN}"},
        "parameters": {"network": "sms"},
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True,
                       "no-shrink": True, "database": "none"},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
                   "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
        "continue-on-failure": True,
        "request-timeout": 30,
        "cache": {"enabled": False},  # nothing written into the working tree
    })
    return schemathesis.openapi.from_url(served_api + "/openapi.yaml", config=config)


@pytest.mark.integration
def test_every_operation_answers_as_documented(api_schema: schemathesis.BaseSchema) -> None:
    """The schema's examples, its coverage cases (boundaries, missing and wrong values, methods
    it does not list) and generated valid and invalid cases, for every operation."""
    failures: dict[str, str] = {}  # one example of each kind of failure per operation
    errors: list[str] = []
    statuses: Counter[int] = Counter()
    operations: set[str] = set()
    for event in schemathesis.engine.from_schema(api_schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            operations.add(recorder.label)
            for interaction in recorder.interactions.values():
                if interaction.response is not None:
                    statuses[interaction.response.status_code // 100 * 100] += 1
            for checks in recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        info = check.failure_info
                        failures.setdefault(f"{recorder.label}: {info.failure.title}",
                                            f"{recorder.label}: {info.failure}\n"
                                            f"{info.code_sample}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            errors.append(repr(event))
    print(f"{len(operations)} operations; answers by class: {dict(statuses)}")
    assert not errors, errors
    assert len(operations) >= 15, operations
    assert statuses[200] >= 20 and statuses[400] >= 500, statuses  # both ways were exercised
    assert not failures, f"{len(failures)} kind(s) of failure:\n\n" + "\n\n".join(
        failures.values())
