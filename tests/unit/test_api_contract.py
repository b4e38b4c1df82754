"""openapi.yaml and the code agree: every route and method, the statuses every route can
answer, the fields each handler reads with their limits, every errcode, and every example."""

from __future__ import annotations

import importlib
import pkgutil
from importlib import resources
from types import SimpleNamespace
from typing import Any, cast

import jsonschema
import pytest
from ruamel.yaml import YAML

import dmbridge
from dmbridge.api import body
from dmbridge.api.app import ROUTES, api_app
from dmbridge.api.operations import OPERATIONS, Operations
from dmbridge.dms import _USER_ID
from dmbridge.errors import BridgeError
from dmbridge.media import MXC

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    text = resources.files("dmbridge.api").joinpath("openapi.yaml").read_text()
    return cast(dict[str, Any], YAML(typ="safe").load(text))


def _resolve(spec: dict[str, Any], node: Any, depth: int = 0) -> Any:
    """The node with every local ``$ref`` replaced by what it points at."""
    assert depth < 30, "a $ref cycle"
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return _resolve(spec, target, depth + 1)
        return {k: _resolve(spec, v, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(spec, v, depth + 1) for v in node]
    return node


def _operations(spec: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (METHOD, path, operation with refs resolved and path parameters in)."""
    found = {}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                op = _resolve(spec, {**op, "parameters": [*item.get("parameters", []),
                                                          *op.get("parameters", [])]})
                found[op["operationId"]] = (method.upper(), path, op)
    return found


def test_every_route_is_documented_with_its_methods_and_nothing_else(spec: dict[str, Any]
                                                                     ) -> None:
    settings = SimpleNamespace(rate_limits=SimpleNamespace(request_wait=1.0))
    none = cast(Any, None)
    app = api_app(Operations(none, none, none, cast(Any, settings), none))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None}
    documented = {(method, path) for method, path, _ in _operations(spec).values()}
    assert routes == documented


def test_each_operation_is_served_under_its_operation_id(spec: dict[str, Any]) -> None:
    """The operations the HTTP handlers and in-process clients share are named as in the
    document, at its method and path."""
    documented = _operations(spec)
    assert {name: (method, "/networks/{network}" + path)
            for name, (method, path) in ROUTES.items()} == {
        name: documented[name][:2] for name in ROUTES}
    assert set(OPERATIONS) == set(ROUTES)


def test_every_network_route_documents_the_answers_it_can_give(spec: dict[str, Any]) -> None:
    for op_id, (_, path, op) in _operations(spec).items():
        statuses = set(op["responses"])
        assert "500" in statuses, op_id
        if not path.startswith("/networks/"):
            assert op.get("security") == [], op_id  # no token, so no 401
            continue
        # The token checks and per-network quotas come before any handler.
        assert {"401", "403", "404", "429"} <= statuses, op_id
        headers = op["responses"]["429"].get("headers", {})
        assert headers["Retry-After"]["schema"]["type"] == "integer", op_id
        if op_id in body.QUERY_FIELDS or op_id in body.NUMBERS:
            assert "400" in statuses, op_id
        if op_id in body.QUERY_FIELDS:
            assert "413" in statuses, op_id  # a string over its maxLength
        content = op.get("requestBody", {}).get("content", {})
        if "application/json" in content:
            assert {"400", "413"} <= statuses, op_id
        for status, answer in op["responses"].items():
            if status >= "400":
                schema = answer["content"]["application/json"]["schema"]
                assert schema["required"] == ["errcode", "error"], (op_id, status)


def _body_schema(op: dict[str, Any]) -> dict[str, Any]:
    return cast(dict[str, Any], op["requestBody"]["content"]["application/json"]["schema"])


def _check_text(op_id: str, field: body.Text, schema: dict[str, Any], required: bool) -> None:
    assert required == field.required, (op_id, field.key)
    if field.required:
        assert schema.get("minLength") == 1, (op_id, field.key)
    if "enum" in schema:
        assert all(v is None or len(v) <= field.max_len for v in schema["enum"]), (op_id, field)
    else:
        assert schema.get("maxLength") == field.max_len, (op_id, field.key)


def test_fields_the_handlers_read_have_the_documented_limits(spec: dict[str, Any]) -> None:
    operations = _operations(spec)
    for op_id, fields in body.BODY_FIELDS.items():
        schema = _body_schema(operations[op_id][2])
        for field in fields:
            assert field.key in schema["properties"], (op_id, field.key)
            _check_text(op_id, field, schema["properties"][field.key],
                        field.key in schema.get("required", []))
        # and the other way round: every limited string the schema states is checked
        limited = {k for k, v in schema["properties"].items() if "maxLength" in v}
        assert limited <= {f.key for f in fields} | {"key"}, op_id  # 'key': the service's
    for op_id, fields in body.QUERY_FIELDS.items():
        params = {p["name"]: p for p in operations[op_id][2]["parameters"] if p["in"] == "query"}
        for field in fields:
            _check_text(op_id, field, params[field.key]["schema"],
                        params[field.key].get("required", False))
    for op_id, flags in body.FLAGS.items():
        properties = _body_schema(operations[op_id][2])["properties"]
        for flag in flags:
            assert properties[flag.key]["type"] == ["boolean", "null"], (op_id, flag.key)
            assert properties[flag.key]["default"] is flag.default, (op_id, flag.key)
    for op_id, integers in body.INTEGERS.items():
        properties = _body_schema(operations[op_id][2])["properties"]
        for integer in integers:
            assert properties[integer.key]["type"] == ["integer", "null"], (op_id, integer.key)
    for op_id, numbers in body.NUMBERS.items():
        op = operations[op_id][2]
        where = {p["name"]: p["schema"] for p in op["parameters"] if p["in"] == "query"}
        if "requestBody" in op:
            where.update(_body_schema(op)["properties"])
        for number in numbers:
            schema = where[number.key]
            assert schema["type"] == ("integer" if number.integer else "number"), number
            assert (schema["minimum"], schema["maximum"], schema["default"]) == (
                number.low, number.high, number.default), number


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


def test_every_boolean_or_integer_a_body_documents_is_declared(spec: dict[str, Any]) -> None:
    """The other way round for typed fields: the schema states none the code does not read
    through a declaration (``typing``, required, is read by its handler)."""
    operations = _operations(spec)
    for op_id in body.BODY_FIELDS:
        properties = _body_schema(operations[op_id][2])["properties"]
        declared = {f.key for f in (*body.FLAGS.get(op_id, ()), *body.INTEGERS.get(op_id, ()),
                                    *body.NUMBERS.get(op_id, ()))}
        typed = {k for k, v in properties.items()
                 if {"boolean", "integer"} & _types(v)}
        assert typed - {"typing"} <= declared, op_id


def test_id_lists_have_the_documented_limits(spec: dict[str, Any]) -> None:
    for name in ("IdList", "RetryRequest"):
        ids = spec["components"]["schemas"][name]["properties"]["ids"]
        assert ids["maxItems"] == body.MAX_IDS
        assert (ids["items"]["minimum"], ids["items"]["maximum"]) == (1, body.MAX_ID)


def _all_subclasses(cls: type) -> set[type]:
    return {cls, *(s for sub in cls.__subclasses__() for s in _all_subclasses(sub))}


def test_every_errcode_is_documented(spec: dict[str, Any]) -> None:
    for module in pkgutil.walk_packages(dmbridge.__path__, "dmbridge."):
        if module.name not in ("dmbridge.__main__", "dmbridge.demo", "dmbridge.localhs"):
            importlib.import_module(module.name)
    errcodes = {c.errcode for c in _all_subclasses(BridgeError)}
    errcodes |= {"M_UNRECOGNIZED", "M_LIMIT_EXCEEDED"}  # aiohttp's 404/405; rate limits
    assert errcodes <= set(spec["components"]["schemas"]["Error"]["properties"]["errcode"]["enum"])


def test_every_example_fits_its_schema(spec: dict[str, Any]) -> None:
    """An example the schema refuses cannot work: schemathesis sends request examples as is."""
    checked = 0
    for _, _, op in _operations(spec).values():
        bodies = [op.get("requestBody", {}).get("content", {})]
        bodies += [answer.get("content", {}) for answer in op["responses"].values()]
        for content in bodies:
            for media in content.values():
                schema = media.get("schema")
                examples = [e["value"] for e in media.get("examples", {}).values()]
                examples += [media["example"]] if "example" in media else []
                for example in examples:
                    jsonschema.validate(example, schema, cls=jsonschema.Draft202012Validator)
                    checked += 1
        for param in op["parameters"]:
            if "example" in param:
                jsonschema.validate(param["example"], param["schema"],
                                    cls=jsonschema.Draft202012Validator)
                checked += 1
    assert checked > 50


def test_patterns_are_the_ones_the_code_checks(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["Recipient"]["pattern"] == f"^{_USER_ID.pattern}$"
    assert schemas["SendMessageRequest"]["properties"]["media"]["pattern"] == f"^{MXC.pattern}$"
    assert schemas["SenderAvatar"]["pattern"] == f"^({MXC.pattern})?$"


HOSTILE_EVENTS: list[dict[str, Any]] = [
    {"event_id": "$m1", "type": "m.room.message", "origin_server_ts": "x",
     "content": {"msgtype": 5, "body": ["not text"], "format": "org.matrix.custom.html",
                 "formatted_body": {"no": "html"}}},
    {"event_id": "$m2", "type": "m.room.message", "origin_server_ts": 2**64,
     "content": {"msgtype": "m.image", "body": "a.png", "url": "mxc://hs/abc",
                 "info": {"size": "12", "w": -1, "h": 1.5, "mimetype": 7}}},
    {"event_id": "$m3", "type": "m.sticker", "origin_server_ts": True, "content": {}},
]


@pytest.mark.parametrize("raw", HOSTILE_EVENTS)
def test_what_platforms_get_from_odd_homeserver_events_fits_the_event_schema(
    spec: dict[str, Any], raw: dict[str, Any]
) -> None:
    from dmbridge import payloads

    lane = payloads.Lane("sms", "+15551234567", "@alice:hs", "@dm_sms_x:hs")
    event_schema = _resolve(spec, spec["components"]["schemas"]["Event"])
    produced = [
        payloads.message(lane, "!r", raw, None, 1),
        payloads.edit(lane, "!r", raw, raw["content"], "$t", 1),
        payloads.reaction(lane, "!r", raw, "k", payloads.target("$t", None), 1),
        payloads.redaction(lane, "!r", raw, payloads.target("$t", None), None, 1),
        payloads.read(lane, "!r", "$t", "m1", raw["origin_server_ts"], 1),
    ]
    for payload in produced:
        media = payload.get("message", {}).get("media")
        if media is not None:  # the link is added as the event is handed out
            media.update(url="https://bridge.example/_dmbridge/v1/networks/sms/media/hs/abc",
                         expires_at=2)
        jsonschema.validate({"id": 1, **payload}, event_schema,
                            cls=jsonschema.Draft202012Validator)
