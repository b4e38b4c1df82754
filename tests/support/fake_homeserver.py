"""A small in-process homeserver that records every request the bridge makes to it.

It implements just the client-server endpoints the bridge calls, with the behaviours that
matter for DMs: registration conflicts, profiles (404 for unknown users), createRoom, m.direct
account data, sends deduplicated by transaction ID, invites. Tests can make endpoints fail or
slow down to probe error paths and races.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.fake_keys import FakeKeys


@dataclass
class Room:
    room_id: str
    creator: str
    create: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    members: dict[str, str] = field(default_factory=dict)
    forgotten_by: set[str] = field(default_factory=set)

    def state(self, kind: str, state_key: str) -> dict[str, Any] | None:
        """The content of a state event from createRoom's initial_state, or a membership."""
        if kind == "m.room.member":
            membership = self.members.get(state_key)
            return {"membership": membership} if membership else None
        for event in self.create.get("initial_state", []):
            if (event["type"], event.get("state_key", "")) == (kind, state_key):
                return dict(event["content"])
        return None


# The bridge's checks of its homeserver: not requests a DM operation makes, so not recorded.
_CHECKS = {"versions", "whoami", "ping"}


class FakeHomeserver:
    def __init__(self, as_token: str, domain: str = "localhost", room_version: str = "12",
                 record: bool = True) -> None:
        self.as_token = as_token
        self.record = record
        self.domain = domain
        self.bot = f"@dmbridge_bot:{domain}"  # the example config's appservice.bot_username
        self.room_version = room_version
        self.requests: list[tuple[str, str]] = []
        self.users: set[str] = set()
        self.displaynames: dict[str, str] = {}
        self.rooms: dict[str, Room] = {}
        self.account_data: dict[tuple[str, str], Any] = {}
        self.sent: dict[tuple[str, str], str] = {}
        self.invites: list[tuple[str, str, dict[str, Any]]] = []
        self.fail: dict[str, tuple[int, dict[str, Any]]] = {}
        """Endpoint name -> (status, body) to answer instead of doing the work."""
        self.fail_times: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        # Endpoint name -> what happens just before the next such request is answered (once).
        self.before: dict[str, Callable[[], Awaitable[Any]]] = {}
        # Called with each new room before createRoom answers (a transaction arriving early).
        self.on_room_created: Callable[[Room], Awaitable[None]] | None = None
        self.media: dict[str, tuple[str, bytes]] = {}
        self.ping_duration_ms: int | None = 1  # what the ping answers (None: nothing)
        self.ping_offered = True  # False: a homeserver older than the ping (404 M_UNRECOGNIZED)
        self.keys = FakeKeys()  # devices and keys for encrypted rooms
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def add_human(self, localpart: str) -> str:
        user_id = f"@{localpart}:{self.domain}"
        self.users.add(user_id)
        self.keys.add_human(user_id)
        return user_id

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        v3 = "/_matrix/client/v3"
        app.router.add_get("/_matrix/client/versions", self._versions, name="versions")
        app.router.add_post(v3 + "/register", self._register, name="register")
        app.router.add_get(v3 + "/profile/{user_id}", self._profile, name="profile")
        app.router.add_put(v3 + "/profile/{user_id}/displayname", self._set_displayname,
                           name="displayname")
        app.router.add_get(v3 + "/capabilities", self._capabilities, name="capabilities")
        app.router.add_post(v3 + "/createRoom", self._create_room, name="createRoom")
        data = app.router.add_resource(v3 + "/user/{user_id}/account_data/{type}",
                                       name="account_data")
        data.add_route("GET", self._get_account_data)
        data.add_route("PUT", self._put_account_data)
        app.router.add_put(v3 + "/rooms/{room_id}/send/{type}/{txn_id}", self._send,
                           name="send")
        app.router.add_post(v3 + "/rooms/{room_id}/invite", self._invite, name="invite")
        app.router.add_put(v3 + "/rooms/{room_id}/state/m.room.member/{state_key}",
                           self._member_state, name="member_state")
        app.router.add_get(v3 + "/joined_rooms", self._joined_rooms, name="joined_rooms")
        app.router.add_get(v3 + "/rooms/{room_id}/state/{type}/{state_key:.*}", self._get_state,
                           name="get_state")
        for action in ("kick", "leave", "forget"):
            app.router.add_post(v3 + "/rooms/{room_id}/" + action, self._membership_change,
                                name=action)
        app.router.add_post("/_matrix/client/v1/appservice/{id}/ping", self._ping, name="ping")
        app.router.add_get(v3 + "/account/whoami", self._whoami, name="whoami")
        app.router.add_post("/_matrix/media/v3/upload", self._upload, name="upload")
        app.router.add_get("/_matrix/client/v1/media/download/{server}/{media_id}",
                           self._download, name="download")
        self.keys.install(app, v3)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()

    def fail_next(self, key: str, status: int, body: dict[str, Any], times: int = 1) -> None:
        self.fail[key] = (status, body)
        self.fail_times[key] = times

    def names(self, since: int = 0) -> list[str]:
        """The requests (from index ``since``) as 'METHOD endpoint-name' strings."""
        return [f"{m} {name}" for m, name in self.requests[since:]]

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        name = request.match_info.route.name or request.path
        if self.record and name not in _CHECKS:
            self.requests.append((request.method, name))
        if name == "versions":
            return await handler(request)  # public
        if request.headers.get("Authorization") != f"Bearer {self.as_token}":
            return web.json_response({"errcode": "M_UNKNOWN_TOKEN", "error": "bad"}, status=401)
        key = f"{request.method} {name}"
        if key in self.before:
            await self.before.pop(key)()
        if key in self.delay:
            await asyncio.sleep(self.delay[key])
        if key in self.fail:
            status, body = self.fail[key]
            if key in self.fail_times:
                self.fail_times[key] -= 1
                if not self.fail_times[key]:
                    del self.fail[key], self.fail_times[key]
            return web.json_response(body, status=status)
        return await handler(request)

    def _acting_user(self, request: web.Request) -> str:
        return request.query.get("user_id") or f"@bot:{self.domain}"

    async def _versions(self, _: web.Request) -> web.Response:
        return web.json_response({"versions": ["v1.11"]})

    async def _whoami(self, request: web.Request) -> web.Response:
        return web.json_response({"user_id": request.query.get("user_id") or self.bot})

    async def _ping(self, _: web.Request) -> web.Response:
        if not self.ping_offered:
            return web.json_response({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"},
                                     status=404)
        if self.ping_duration_ms is None:
            return web.json_response({})
        return web.json_response({"duration_ms": self.ping_duration_ms})

    async def _upload(self, request: web.Request) -> web.Response:
        data = bytearray()
        async for chunk in request.content.iter_chunked(65536):
            data += chunk
        media_id = uuid.uuid4().hex
        self.media[media_id] = (request.content_type, bytes(data))
        if not self.record and len(self.media) > 8:  # benchmarks: keep memory bounded
            del self.media[next(iter(self.media))]
        return web.json_response({"content_uri": f"mxc://{self.domain}/{media_id}"})

    async def _download(self, request: web.Request) -> web.Response:
        found = self.media.get(request.match_info["media_id"])
        if found is None:
            return web.json_response({"errcode": "M_NOT_FOUND", "error": "no media"}, status=404)
        return web.Response(body=found[1], content_type=found[0])

    async def _register(self, request: web.Request) -> web.Response:
        body = await request.json()
        user_id = f"@{body['username']}:{self.domain}"
        if user_id in self.users:
            return web.json_response({"errcode": "M_USER_IN_USE", "error": "taken"}, status=400)
        self.users.add(user_id)
        return web.json_response({"user_id": user_id})

    async def _profile(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        if user_id not in self.users:
            return web.json_response({"errcode": "M_UNKNOWN", "error": "No row found"},
                                     status=404)
        return web.json_response({"displayname": self.displaynames.get(user_id, user_id)})

    async def _set_displayname(self, request: web.Request) -> web.Response:
        self.displaynames[request.match_info["user_id"]] = (await request.json())["displayname"]
        return web.json_response({})

    async def _capabilities(self, _: web.Request) -> web.Response:
        return web.json_response({"capabilities": {"m.room_versions": {
            "default": self.room_version, "available": {self.room_version: "stable"}}}})

    async def _create_room(self, request: web.Request) -> web.Response:
        room_id = f"!{uuid.uuid4().hex}"
        body = await request.json()
        creator = self._acting_user(request)
        room = self.rooms[room_id] = Room(room_id, creator, body, members={creator: "join"})
        room.members.update({user_id: "invite" for user_id in body.get("invite", [])})
        if self.on_room_created is not None:
            await self.on_room_created(room)
        if "POST createRoom:after" in self.fail:  # the room is made, then the answer fails
            status, answer = self.fail.pop("POST createRoom:after")
            return web.json_response(answer, status=status)
        return web.json_response({"room_id": room_id})

    def joined_rooms(self, user_id: str) -> list[str]:
        return [r.room_id for r in self.rooms.values() if r.members.get(user_id) == "join"]

    async def _joined_rooms(self, request: web.Request) -> web.Response:
        return web.json_response({"joined_rooms": self.joined_rooms(self._acting_user(request))})

    async def _get_state(self, request: web.Request) -> web.Response:
        room = self.rooms.get(request.match_info["room_id"])
        content = room.state(request.match_info["type"], request.match_info["state_key"]) \
            if room is not None else None
        if content is None:
            return web.json_response({"errcode": "M_NOT_FOUND", "error": "no state"}, status=404)
        if request.query.get("format") == "event":
            return web.json_response({"content": content, "sender": room.creator if room else ""})
        return web.json_response(content)

    async def _membership_change(self, request: web.Request) -> web.Response:
        room = self.rooms[request.match_info["room_id"]]
        user, action = self._acting_user(request), request.match_info.route.name
        if action == "kick":
            room.members[(await request.json())["user_id"]] = "leave"
        elif action == "leave":
            room.members[user] = "leave"
        else:
            room.forgotten_by.add(user)
        return web.json_response({})

    async def _get_account_data(self, request: web.Request) -> web.Response:
        key = (request.match_info["user_id"], request.match_info["type"])
        if key not in self.account_data:
            return web.json_response({"errcode": "M_NOT_FOUND", "error": "none"}, status=404)
        return web.json_response(self.account_data[key])

    async def _put_account_data(self, request: web.Request) -> web.Response:
        key = (request.match_info["user_id"], request.match_info["type"])
        self.account_data[key] = await request.json()
        return web.json_response({})

    async def _send(self, request: web.Request) -> web.Response:
        room_id, txn_id = request.match_info["room_id"], request.match_info["txn_id"]
        key = (room_id, txn_id)
        if key not in self.sent:
            self.sent[key] = f"${uuid.uuid4().hex}"
            if not self.record:
                return web.json_response({"event_id": self.sent[key]})
            self.rooms[room_id].events.append({
                "event_id": self.sent[key], "sender": self._acting_user(request),
                "type": request.match_info["type"], "content": json.loads(await request.read()),
            })
        return web.json_response({"event_id": self.sent[key]})

    async def _member_state(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("membership") == "invite":
            self.invites.append((request.match_info["room_id"], request.match_info["state_key"],
                                 body))
        return web.json_response({"event_id": f"${uuid.uuid4().hex}"})

    async def _invite(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.invites.append((request.match_info["room_id"], body["user_id"], body))
        return web.json_response({})
