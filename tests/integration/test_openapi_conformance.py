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
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

from dmbridge.bridge import Bridge
from tests.integration.conftest import Homeserver
from tests.support.settings import SMS_TOKEN

MAX_EXAMPLES = 25  # per operation and generation mode; derandomised, so every run is the same
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
        "phases": {"stateful": {"enabled": False}},
    })
    return schemathesis.openapi.from_url(served_api + "/openapi.yaml", config=config)


def _run(operation: schemathesis.APIOperation, strategy: st.SearchStrategy[Case],
         failures: dict[str, str], statuses: Counter[int]) -> None:
    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case: Case) -> None:
        try:
            statuses[case.call_and_validate(timeout=30).status_code // 100 * 100] += 1
        except BaseExceptionGroup as group:  # schemathesis's FailureGroup: every failed check
            for failure in group.exceptions:
                title = getattr(failure, "title", type(failure).__name__)
                key = f"{operation.label}: {title}"
                failures.setdefault(key, f"{key}\n{failure}\n{case.as_curl_command()}")

    try:
        check()
    except Unsatisfiable:
        pass  # nothing to make invalid (an operation without parameters or body)


@pytest.mark.integration
def test_every_operation_answers_as_documented(api_schema: schemathesis.BaseSchema) -> None:
    """Explicit examples, then generated cases (valid and invalid) for every operation."""
    failures: dict[str, str] = {}  # one example of each kind of failure per operation
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        for strategy in api_schema.get_strategies_from_examples(operation):
            _run(operation, strategy, failures, statuses)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _run(operation, operation.as_strategy(generation_mode=mode), failures, statuses)
    print(f"answers by class: {dict(statuses)}")
    assert statuses[200] >= 20 and statuses[400] >= 300, statuses  # both ways were exercised
    assert not failures, f"{len(failures)} kind(s) of failure:\n\n" + "\n\n".join(
        failures.values())
