"""The end-to-end encryption part of the fake homeserver: devices, keys and to-device messages.

Each human has one device with a real Olm account (so the bridge's machines can query its keys,
claim a one-time key and encrypt room keys for it); the ghosts' devices and keys are kept as the
bridge uploads them. To-device messages are counted, not delivered.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from mautrix.crypto import OlmAccount
from mautrix.types import DeviceID, UserID

HUMAN_DEVICE = DeviceID("HUMANDEVICE")


class FakeKeys:
    def __init__(self) -> None:
        self.humans: dict[str, OlmAccount] = {}
        self.device_keys: dict[str, dict[str, Any]] = {}  # user -> device -> keys
        self.one_time_keys: dict[tuple[str, str], list[tuple[str, Any]]] = {}
        self.to_device: list[dict[str, Any]] = []  # the bodies of sendToDevice requests

    def add_human(self, user_id: str) -> None:
        account = OlmAccount()
        self.humans[user_id] = account
        keys = account.get_device_keys(UserID(user_id), HUMAN_DEVICE).serialize()
        self.device_keys[user_id] = {HUMAN_DEVICE: keys}
        otks = account.get_one_time_keys(UserID(user_id), HUMAN_DEVICE, 0)
        account.mark_keys_as_published()
        self.one_time_keys[(user_id, HUMAN_DEVICE)] = list(otks.items())

    def install(self, app: web.Application, v3: str) -> None:
        app.router.add_put(v3 + "/devices/{device_id}", self._device, name="device")
        app.router.add_post(v3 + "/keys/upload", self._upload, name="keys_upload")
        app.router.add_post(v3 + "/keys/query", self._query, name="keys_query")
        app.router.add_post(v3 + "/keys/claim", self._claim, name="keys_claim")
        app.router.add_put(v3 + "/sendToDevice/{type}/{txn_id}", self._send_to_device,
                           name="send_to_device")

    async def _device(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=201)

    async def _upload(self, request: web.Request) -> web.Response:
        user_id = request.query["user_id"]
        device_id = request.query["device_id"]
        body = await request.json()
        if body.get("device_keys"):
            self.device_keys.setdefault(user_id, {})[device_id] = body["device_keys"]
        otks = self.one_time_keys.setdefault((user_id, device_id), [])
        otks.extend((body.get("one_time_keys") or {}).items())
        return web.json_response({"one_time_key_counts": {"signed_curve25519": len(otks)}})

    async def _query(self, request: web.Request) -> web.Response:
        wanted = (await request.json()).get("device_keys", {})
        return web.json_response({"device_keys": {
            user_id: self.device_keys.get(user_id, {}) for user_id in wanted}, "failures": {}})

    async def _claim(self, request: web.Request) -> web.Response:
        wanted = (await request.json()).get("one_time_keys", {})
        claimed: dict[str, dict[str, Any]] = {}
        for user_id, devices in wanted.items():
            for device_id in devices:
                otks = self.one_time_keys.get((user_id, device_id))
                if otks:
                    key_id, key = otks.pop()
                    claimed.setdefault(user_id, {})[device_id] = {key_id: key}
        return web.json_response({"one_time_keys": claimed, "failures": {}})

    async def _send_to_device(self, request: web.Request) -> web.Response:
        self.to_device.append(await request.json())
        return web.json_response({})
