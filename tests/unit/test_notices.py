"""Admin notices: deduplicated by kind, summarised, bounded, never the caller's problem."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from yarl import URL

from dmbridge import notices
from dmbridge.notices import AdminNotices, NoticeSettings

ON = NoticeSettings(user="@admin:example.org", repeat_window=600, outage_after=300)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Inbox:
    """What the admin receives; fails the first ``failures`` sends."""

    def __init__(self, failures: int = 0) -> None:
        self.received: list[tuple[str, str]] = []
        self.failures = failures
        self.arrived = asyncio.Event()

    async def __call__(self, kind: str, text: str) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("homeserver down")
        self.received.append((kind, text))
        self.arrived.set()

    async def wait(self, count: int) -> list[str]:
        while len(self.received) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)
        return [text for _, text in self.received]


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notices, "POLL_S", 0.01)
    monkeypatch.setattr(notices, "RETRY_MIN_S", 0.01)


async def test_off_by_default_and_never_sends() -> None:
    inbox = Inbox()
    admin = AdminNotices(NoticeSettings(), inbox)
    admin.start()
    admin.dead_letter("sms", 1, "message", "gave up")
    admin.startup_problem("could not start")
    await admin.stop()
    assert inbox.received == []


async def test_a_kind_again_within_the_window_is_summarised() -> None:
    clock, inbox = Clock(), Inbox()
    admin = AdminNotices(ON, inbox, clock)
    admin.start()
    admin.dead_letter("sms", 1, "message", "gave up after 3 attempt(s)")
    [first] = await inbox.wait(1)
    assert first.startswith("dmbridge: outbox 1 (message) for network 'sms' is a dead letter: "
                            "gave up after 3 attempt(s). `dmbridge dead-letters --network sms`")
    for n in range(2, 6):
        admin.dead_letter("sms", n, "message", "gave up")
    admin.dead_letter("chat", 9, "message", "gave up")  # another network: its own kind
    texts = await inbox.wait(2)
    assert "outbox 9" in texts[1] and "'chat'" in texts[1]
    clock.now += 601
    texts = await inbox.wait(3)
    assert texts[2].startswith("dmbridge: outbox 5 (message)")
    assert texts[2].endswith("(4 notice(s) of this kind in 10 min; this is the latest.)")
    await admin.stop()
    assert len(inbox.received) == 3


async def test_the_queue_is_bounded_and_report_never_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(notices, "QUEUE_SIZE", 3)
    inbox = Inbox()
    admin = AdminNotices(ON, inbox)
    for n in range(5):  # not started: nothing is taken off the queue
        admin.report(f"kind-{n}", f"notice {n}")
    admin.start()
    texts = await inbox.wait(3)
    assert texts == ["notice 0 (2 other notice(s) were dropped: too many at once.)",
                     "notice 1", "notice 2"]
    await admin.stop()


async def test_a_failing_send_is_tried_again_and_the_caller_never_sees_it() -> None:
    inbox = Inbox(failures=3)
    admin = AdminNotices(ON, inbox)
    admin.start()
    admin.startup_problem("the homeserver could not reach the bridge")
    assert await inbox.wait(1) == ["dmbridge: the homeserver could not reach the bridge"]
    await admin.stop()


async def test_a_webhook_outage_is_told_after_outage_after_and_its_end_too() -> None:
    clock, inbox = Clock(), Inbox()
    admin = AdminNotices(ON, inbox, clock)
    admin.start()
    admin.delivery_failed("sms", "connection refused")
    clock.now += 200
    admin.delivery_failed("sms", "connection refused")
    admin.delivery_ok("chat")
    await asyncio.sleep(0.05)
    assert inbox.received == []  # not yet: a short outage is nobody's business
    clock.now += 120
    admin.delivery_failed("sms", "503 Service Unavailable")
    admin.delivery_failed("sms", "503 Service Unavailable")  # told once
    [down] = await inbox.wait(1)
    assert down == ("dmbridge: deliveries to network 'sms' have been failing for 5 min: "
                    "503 Service Unavailable. Replies wait in its queue.")
    clock.now += 60
    admin.delivery_ok("sms")
    texts = await inbox.wait(2)
    assert texts[1] == "dmbridge: deliveries to network 'sms' work again (they failed for 6 min)."
    await admin.stop()
    assert len(inbox.received) == 2


async def test_a_short_webhook_hiccup_is_not_told() -> None:
    clock, inbox = Clock(), Inbox()
    admin = AdminNotices(ON, inbox, clock)
    admin.start()
    admin.delivery_failed("sms", "timeout")
    clock.now += 10
    admin.delivery_ok("sms")
    clock.now += 1000
    admin.delivery_failed("sms", "timeout")  # a new outage starts counting afresh
    await asyncio.sleep(0.05)
    await admin.stop()
    assert inbox.received == []


async def test_a_homeserver_outage_is_told_when_it_is_over() -> None:
    clock, inbox = Clock(), Inbox()
    admin = AdminNotices(ON, inbox, clock)
    admin.start()
    admin.homeserver_unreachable("connection refused")
    clock.now += 30
    admin.homeserver_recovered()  # too short
    admin.homeserver_unreachable("connection refused")
    clock.now += 400
    admin.homeserver_unreachable("502")
    admin.homeserver_recovered()
    admin.homeserver_recovered()
    assert await inbox.wait(1) == ["dmbridge: the homeserver could not be reached for 7 min "
                                   "(last error: 502); it can be again."]
    await admin.stop()
    assert len(inbox.received) == 1


async def test_stop_sends_what_is_queued_first() -> None:
    inbox = Inbox()
    admin = AdminNotices(ON, inbox)
    admin.start()
    admin.startup_problem("could not start: database ...")
    await admin.stop()
    assert [text for _, text in inbox.received] == ["dmbridge: could not start: database ..."]


class Request:
    def __init__(self, path: str) -> None:
        self.method = "GET"
        self.url = URL("http://homeserver.test" + path)


class Response:
    def __init__(self, status: int) -> None:
        self.status = status


async def test_the_homeserver_watch_sees_outages_on_any_call() -> None:
    clock, inbox = Clock(), Inbox()
    admin = AdminNotices(ON, inbox, clock)
    admin.start()

    async def disconnected(req: Any) -> Any:
        raise aiohttp.ServerDisconnectedError()

    async def answers(status: int) -> Any:
        async def handler(req: Any) -> Any:
            return Response(status)
        return handler

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await admin.watch_homeserver(Request("/_matrix/client/v3/sync"), disconnected)
    clock.now += 400
    # The self-check's 502 says the homeserver cannot reach the bridge: it answered, it is up.
    ping = Request("/_matrix/client/v1/appservice/dmbridge/ping")
    assert (await admin.watch_homeserver(ping, await answers(502))).status == 502
    assert await inbox.wait(1) == [
        "dmbridge: the homeserver could not be reached for 7 min (last error: GET "
        "/_matrix/client/v3/sync: Server disconnected); it can be again."]
    clock.now += 700
    # A proxy in front of a homeserver that is down answers 502 itself.
    await admin.watch_homeserver(Request("/_matrix/client/v3/profile/x"), await answers(502))
    clock.now += 300
    await admin.watch_homeserver(Request("/_matrix/client/v3/profile/x"), await answers(404))
    assert (await inbox.wait(2))[1] == (
        "dmbridge: the homeserver could not be reached for 5 min (last error: GET "
        "/_matrix/client/v3/profile/x: 502); it can be again.")
    await admin.stop()
