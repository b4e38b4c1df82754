"""The rules of original times, thread content, the body fields that carry them, and the
network's description."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from dmbridge_client import escape_remote_id
from mautrix.errors import make_request_error
from mautrix.types import EventID

from dmbridge.api.body import NEW, TS
from dmbridge.api.discovery import describe
from dmbridge.errors import BadRequest, HomeserverError, InvalidParam
from dmbridge.relations import thread_content, thread_refused
from dmbridge.timestamps import EARLIEST_MS, MAX_AHEAD_MS, check_origin_ts
from tests.support.settings import make_settings

NOW = 1_767_225_600_000


@pytest.mark.parametrize("ts", [NOW, NOW - 20 * 365 * 86_400_000, NOW + MAX_AHEAD_MS,
                                EARLIEST_MS])
def test_times_from_1990_to_five_minutes_ahead_are_taken(ts: int) -> None:
    assert check_origin_ts(ts, NOW) == ts


def test_a_time_too_far_ahead_is_refused_saying_how_far() -> None:
    with pytest.raises(InvalidParam) as info:
        check_origin_ts(NOW + MAX_AHEAD_MS + 1000, NOW)
    assert str(info.value) == (f"'ts' {NOW + MAX_AHEAD_MS + 1000} is 301 s ahead of the bridge's"
                               " clock; at most 300 s ahead is accepted (milliseconds since the"
                               " epoch)")


@pytest.mark.parametrize(("ts", "hint"), [
    (NOW // 1000, " (seconds given for milliseconds?)"),
    (0, ""),
    (-5, ""),
    (EARLIEST_MS - 1, ""),
])
def test_a_time_before_1990_is_refused(ts: int, hint: str) -> None:
    with pytest.raises(InvalidParam) as info:
        check_origin_ts(ts, NOW)
    assert str(info.value) == (f"'ts' {ts} is before 1990-01-01; it must be milliseconds since"
                               f" the epoch{hint}")


@pytest.mark.parametrize(("body", "ts"), [({}, None), ({"ts": None}, None), ({"ts": 5}, 5)])
def test_ts_is_an_integer_or_absent(body: dict[str, Any], ts: int | None) -> None:
    assert TS.get(body) == ts


@pytest.mark.parametrize("value", [True, 1.5, "1767225600000", [1]])
def test_ts_of_another_type_is_refused(value: Any) -> None:
    with pytest.raises(BadRequest) as info:
        TS.get({"ts": value})
    assert (info.value.status, info.value.errcode, str(info.value)) == (
        400, "M_BAD_JSON", "'ts' must be an integer")


@pytest.mark.parametrize(("body", "new"), [({}, False), ({"new": None}, False),
                                           ({"new": True}, True), ({"new": False}, False)])
def test_new_is_true_or_false(body: dict[str, Any], new: bool) -> None:
    assert NEW.get(body) is new


@pytest.mark.parametrize("value", [1, "true", 0, {}])
def test_new_of_another_type_is_refused(value: Any) -> None:
    with pytest.raises(BadRequest) as info:
        NEW.get({"new": value})
    assert str(info.value) == "'new' must be true or false"


def test_a_thread_message_falls_back_to_a_reply_to_the_root() -> None:
    content = {"msgtype": "m.text", "body": "It left the depot."}
    assert thread_content(content, EventID("$root"), None) == {
        **content,
        "m.relates_to": {"rel_type": "m.thread", "event_id": "$root", "is_falling_back": True,
                         "m.in_reply_to": {"event_id": "$root"}},
    }
    assert content == {"msgtype": "m.text", "body": "It left the depot."}  # not changed


def test_a_thread_message_that_answers_one_is_a_real_reply() -> None:
    relates = thread_content({"body": "x"}, EventID("$root"), EventID("$answered"))
    assert relates["m.relates_to"] == {"rel_type": "m.thread", "event_id": "$root",
                                       "is_falling_back": False,
                                       "m.in_reply_to": {"event_id": "$answered"}}


def _refusal(cause: Exception) -> HomeserverError:
    try:
        raise HomeserverError("the homeserver did not take the message") from cause
    except HomeserverError as e:
        return e


def test_only_the_homeservers_refusal_of_a_thread_root_is_told_apart() -> None:
    synapse = "Cannot start threads from an event with a relation"
    def answer(status: int, errcode: str, message: str) -> Exception:
        return make_request_error(status, "{}", errcode, message)

    assert thread_refused(_refusal(answer(400, "M_UNKNOWN", synapse)))
    assert not thread_refused(_refusal(answer(400, "M_UNKNOWN",
                                              "Can't send relation to unknown event")))
    assert not thread_refused(_refusal(answer(502, "M_UNKNOWN", synapse)))
    assert not thread_refused(_refusal(answer(403, "M_FORBIDDEN", "not in room")))
    assert not thread_refused(HomeserverError("no cause"))


def test_the_description_names_ghosts_as_the_network_makes_them(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, homeserver_url="http://127.0.0.1:1", domain="hs.test",
                             port=1, db_url=f"sqlite:///{tmp_path / 'db'}")
    for network in settings.networks:
        info = describe(network, settings)
        assert info["network"] == network.id
        assert info["delivery"] == {"mode": network.delivery.mode}
        assert info["limits"]["max_upload_bytes"] == settings.media.max_upload_bytes
        for remote_id in {"sms": ["+15551234567"], "chat": ["Bob_Smith", "a.b-c"]}[
                network.id]:
            assert re.fullmatch(info["remote_id_pattern"], remote_id)
            ghost = network.ghost_user_id(remote_id)
            filled = info["ghost_user_id_template"].replace("{remote_id}",
                                                            escape_remote_id(remote_id))
            assert filled == ghost
            assert network.parse_ghost(ghost) == remote_id
    chat = describe(settings.networks.get("chat"), settings)
    assert chat["ghost_user_id_template"].replace(
        "{remote_id}", escape_remote_id("Bob_Smith")) == "@dm_chat__bob___smith:hs.test"

