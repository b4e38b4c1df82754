"""The config file (commented, upgraded in place) and the typed settings validated from it."""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from mautrix.util.config import BaseFileConfig, ConfigUpdateHelper
from ruamel.yaml import YAML
from ruamel.yaml.comments import Comment, CommentedBase
from ruamel.yaml.error import YAMLError
from yarl import URL

from .configkeys import Finding, Keys, check_env, check_file, dotted, known_keys
from .files import PRIVATE, replace_file
from .listener import ListenerSettings
from .localpart import is_valid_localpart
from .networks import PULL, PUSH, Delivery, Network, Networks
from .notices import NoticeSettings
from .permissions import RuleError, UserRules
from .quotas import QuotaSettings
from .startup import current_user

EXAMPLE = "pkg://dmbridge/example-config.yaml"
ENV_PREFIX = "DMBRIDGE_"
PLACEHOLDER = "generate"
# dm.pickle_key: the ghosts' Olm accounts and room keys are encrypted with it in the database.
PICKLE_KEY_MIN = 32
LOG_FORMATS = ("text", "json")
ON_LEAVE = ("reinvite", "new_room")
# dm.encryption, from no encryption at all to encrypted DMs only (README: "Encrypted DMs").
ENCRYPTION = ("off", "allow", "default", "require")
RETENTION_KEYS = ("message_maps", "history", "media", "dead_letters")
_NETWORK_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_DOMAIN = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")

log = logging.getLogger("dmbridge.config")


class ConfigError(ValueError):
    """A config value is missing or wrong; names the key (and where it was written)."""

    def __init__(self, key: str, problem: str, where: str = "") -> None:
        super().__init__(f"config key '{key}'{f' ({where})' if where else ''}: {problem}")
        self.key = key


class ConfigErrors(ConfigError):
    """Several keys are wrong at once (unknown keys); one line each."""

    def __init__(self, errors: list[ConfigError]) -> None:
        ValueError.__init__(self, "\n".join(str(e) for e in errors))
        self.key = errors[0].key
        self.errors = errors

    @classmethod
    def of(cls, findings: list[Finding]) -> ConfigErrors:
        return cls([ConfigError(f.key, f.problem, f.where) for f in findings])


class Need(Enum):
    """A network key without a default value."""

    REQUIRED = "required"
    ID = "the network's `id`"
    NONE = "none"


class Config(BaseFileConfig):
    """The YAML file. ``update()`` rebuilds it from the packaged example, keeping user values."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(str(path), EXAMPLE)
        self._text = ""  # the file as read: a save that would not change it writes nothing
        self._keys: Keys | None = None

    def known_keys(self) -> Keys:
        """The keys this file may hold: the packaged example's, and NETWORK_KEYS in networks."""
        if self._keys is None:
            base = self.load_base()
            assert base is not None  # packaged with dmbridge
            self._keys = known_keys(base._data, {"networks": NETWORK_KEYS})
        return self._keys

    def load(self) -> None:
        """Read the file; a file that cannot be read or parsed is a ConfigError naming it."""
        try:
            self._text = Path(self.path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("(file)", f"{self.path} does not exist; create it with "
                              "`dmbridge generate`") from None
        except (OSError, UnicodeDecodeError) as e:
            cause = e.strerror if isinstance(e, OSError) else str(e)
            raise ConfigError("(file)", f"{self.path} cannot be read by {current_user()}: "
                              f"{cause}; make it readable by that user") from None
        try:
            self._data = _YAML.load(self._text)
        except YAMLError as e:
            raise ConfigError("(file)", f"{self.path} is not valid YAML, {_yaml_problem(e)}"
                              ) from None

    def load_example(self) -> None:
        """Start from the packaged example (for a config file that does not exist yet)."""
        base = self.load_base()
        assert base is not None  # packaged with dmbridge
        self._data = base._data
        self._text = ""

    def text(self) -> str:
        stream = io.StringIO()
        _YAML.dump(self._data, stream)
        return stream.getvalue()

    def save(self, text: str | None = None) -> None:
        """Write the file (or ``text``, an earlier state of it) if its text changed,
        atomically, keeping its owner and mode.

        Raises ``OSError`` and leaves the file as it was if it cannot; mautrix's own save
        would give it this process's owner and mode 0600 and warn only.
        """
        text = self.text() if text is None else text
        if text != self._text:
            replace_file(Path(self.path), text)
            self._text = text

    def update(self, save: bool = True) -> None:
        """Rebuild the file from the packaged example with the user's values.

        Refuses (ConfigError) rather than drop a key the user wrote: check the keys first.
        """
        source = self._data
        super().update(save=False)
        lost = _lost_keys(source, self._data, ())
        if lost:
            raise ConfigError(lost, "would be lost by the upgrade; the file is left as it was")
        if save:
            self.save()

    def do_update(self, helper: ConfigUpdateHelper) -> None:
        """Every key of the example takes the file's value, if it has one (not null).

        A new key in the example needs nothing here; a list (networks) is taken whole.
        """
        _merge(helper.base._data, helper.source._data)

    def fill_placeholders(self) -> bool:
        """Replace every "generate" token with a fresh secret; True if anything changed."""
        changed = False
        for key in ("appservice.as_token", "appservice.hs_token", "dm.pickle_key"):
            if self[key] == PLACEHOLDER:
                self[key] = secrets.token_urlsafe(32)
                changed = True
        for network in self["networks"] or []:
            tokens = network.get("tokens") or []
            for i, token in enumerate(tokens):
                if token == PLACEHOLDER:
                    tokens[i] = secrets.token_urlsafe(32)
                    changed = True
            delivery = network.get("delivery")
            if isinstance(delivery, dict) and delivery.get("secret") == PLACEHOLDER:
                delivery["secret"] = secrets.token_urlsafe(32)
                changed = True
        return changed

    def apply_env(self, environ: Mapping[str, str]) -> list[str]:
        """Apply DMBRIDGE_A__B__C=value overrides (values parsed as YAML); returns the keys set."""
        applied = []
        for name, raw in sorted(environ.items()):
            if not name.startswith(ENV_PREFIX):
                continue
            path = name[len(ENV_PREFIX) :].lower().split("__")
            if path[0] not in self.known_keys():
                continue  # another program's DMBRIDGE_ variable (DMBRIDGE_CACHE, ...)
            _set_path(self._data, path, raw, name)
            applied.append(".".join(path))
        return applied


# As mautrix.util.config writes: an upgraded file looks the same whichever of them wrote it.
_YAML = YAML()
_YAML.indent(4)
_YAML.width = 200


def _yaml_problem(e: YAMLError) -> str:
    """One line: where the parser stopped, what it found, and what it was reading."""
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem
    context_mark = getattr(e, "context_mark", None)
    if context and context_mark:
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        text += f" ({context})"
    return text


def _merge(base: MutableMapping[Any, Any], source: Mapping[Any, Any]) -> None:
    for key, value in source.items():
        if key not in base or value is None:
            continue  # unknown keys are refused before; null means the example's value
        if isinstance(base[key], Mapping) and isinstance(value, Mapping):
            _merge(base[key], value)
            continue
        if isinstance(value, CommentedBase):  # the example's comments, not the user's, stay
            setattr(value, Comment.attrib, Comment())
        base[key] = value


def _lost_keys(source: Any, result: Any, path: tuple[str | int, ...]) -> str:
    """The first key of ``source`` missing from ``result``, dotted; "" if none."""
    if isinstance(source, Mapping) and isinstance(result, Mapping):
        for key, value in source.items():
            if key not in result:
                return dotted((*path, key))
            lost = _lost_keys(value, result[key], (*path, key))
            if lost:
                return lost
    elif isinstance(source, list) and isinstance(result, list):
        if len(result) < len(source):
            return dotted((*path, len(result)))
        for i, value in enumerate(source):
            lost = _lost_keys(value, result[i], (*path, i))
            if lost:
                return lost
    return ""


def _set_path(data: Any, path: list[str], value: Any, env_name: str) -> None:
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(data, list):
            if not part.isdigit() or int(part) >= len(data):
                raise ConfigError(".".join(path[: i + 1]), f"{env_name} names no existing item")
            index: Any = int(part)
        elif isinstance(data, dict):
            index = part
            if not last and index not in data:
                data[index] = {}
        else:
            raise ConfigError(".".join(path[:i]), f"{env_name} goes inside a plain value")
        if last:
            data[index] = _env_value(value, data[index] if _has(data, index) else None)
        else:
            data = data[index]


def _has(data: Any, index: Any) -> bool:
    return index in data if isinstance(data, dict) else index < len(data)


def _env_value(raw: str, current: Any) -> Any:
    """A string where the config holds a string (templates, tokens); otherwise a YAML scalar."""
    if isinstance(current, str):
        return raw
    try:
        value = YAML(typ="safe").load(raw)
    except YAMLError:
        return raw
    return value if isinstance(value, str | int | float | bool) or value is None else raw


@dataclass(frozen=True)
class DeliverySettings:
    """How hard the bridge tries to hand platforms what they are owed."""

    max_attempts: int = 20
    max_age: float = 86400.0
    initial_backoff: float = 1.0
    max_backoff: float = 600.0
    timeout: float = 10.0
    concurrency: int = 8
    pull_ack_timeout: float = 60.0
    pull_max_wait: float = 60.0


@dataclass(frozen=True)
class MediaSettings:
    """Media platforms upload, and the links through which they fetch Matrix users' media."""

    max_upload_bytes: int = 50 * 1024 * 1024
    link_ttl: float = 86400.0
    public_url: str = ""
    """The bridge's address as platforms reach it; links to media start with it."""


@dataclass(frozen=True)
class RateLimitSettings:
    """How long rate limits are waited out, and how fast the bridge opens rooms."""

    request_wait: float = 20.0
    """Seconds a platform's request may spend waiting, in all; then it is answered 429."""
    background_wait: float = 60.0
    """Seconds background work waits for one homeserver call; then it tries again later."""
    rooms_per_second: float = 1.0
    room_burst: int = 10


@dataclass(frozen=True)
class RetentionSettings:
    """Days each kind of row is kept before it is pruned; 0 keeps it forever."""

    message_maps: float = 90.0
    """Both message maps: what platforms sent (by their IDs) and what Matrix users sent."""
    history: float = 365.0
    media: float = 30.0
    dead_letters: float = 30.0


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics: whether they are served, and where."""

    enabled: bool = True
    listen: tuple[str, int] | None = None
    """A separate (host, port) to serve ``GET /metrics`` on; None: the bridge's listener."""


@dataclass(frozen=True)
class Settings:
    """Everything the bridge needs, validated. Built only through :func:`load_settings`."""

    homeserver_url: str
    domain: str
    appservice_address: str
    hostname: str
    port: int
    appservice_id: str
    bot_localpart: str
    as_token: str
    hs_token: str
    database_url: str
    db_min_size: int
    db_max_size: int
    max_body_bytes: int
    creation_timeout: float
    networks: Networks
    log_level: str
    on_leave: str = "reinvite"
    encryption: str = "off"
    pickle_key: str = ""  # encrypts the ghosts' crypto state at rest; "" with encryption off
    delivery: DeliverySettings = DeliverySettings()
    media: MediaSettings = MediaSettings()
    listener: ListenerSettings = field(default_factory=ListenerSettings)
    rate_limits: RateLimitSettings = RateLimitSettings()
    admin_notices: NoticeSettings = field(default_factory=NoticeSettings)
    retention: RetentionSettings = RetentionSettings()
    log_format: str = "text"
    metrics: MetricsSettings = MetricsSettings()

    @property
    def bot_user_id(self) -> str:
        return f"@{self.bot_localpart}:{self.domain}"

    def registration(self) -> dict[str, Any]:
        """The appservice registration the homeserver needs."""
        users = [{"exclusive": True, "regex": n.namespace_regex()} for n in self.networks]
        users.append({"exclusive": True, "regex": "^@" + re.escape(self.bot_localpart) + ":"
                      + re.escape(self.domain) + "$"})
        return {
            "id": self.appservice_id,
            "url": self.appservice_address,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.bot_localpart,
            # The bridge paces itself and keeps per-network quotas; the homeserver's per-user
            # limits are made for one person typing (README: "Rate limits").
            "rate_limited": False,
            # Typing and read receipts (MSC2409), under the stable and the older unstable key.
            "receive_ephemeral": True,
            "de.sorunome.msc2409.push_ephemeral": True,
            # Encrypted DMs: the bridge makes a device for each ghost (MSC4190) and is told of
            # one-time key counts and device list changes (MSC3202) (README: "Encrypted DMs").
            "io.element.msc4190": True,
            "org.matrix.msc3202": True,
            "namespaces": {"users": users, "aliases": [], "rooms": []},
        }


class _Reader:
    """Typed access to raw config values; every failure names its key."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def get(self, key: str) -> Any:
        value = self.config.get(key, None)
        if value is None:
            raise ConfigError(key, "missing")
        return value

    def text(self, key: str, pattern: re.Pattern[str] | None = None, secret: bool = False) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, f"must be a non-empty string, got {value!r}")
        if secret and value == PLACEHOLDER:
            raise ConfigError(key, 'still "generate"; run `dmbridge generate` to fill it in')
        if secret and len(value) < 16:
            raise ConfigError(key, "must be 16 characters or more")
        if pattern and not pattern.fullmatch(value):
            raise ConfigError(key, f"{value!r} does not match {pattern.pattern}")
        return value

    def url(self, key: str) -> str:
        value = self.text(key)
        try:
            url = URL(value)
            valid = url.scheme in ("http", "https") and bool(url.host) and url.port is not None
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(key, f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(key, f"must be an integer from {low} to {high}, got {value!r}")
        return value

    def number(self, key: str, low: float, high: float) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            low <= value <= high
        ):
            raise ConfigError(key, f"must be a number from {low} to {high}, got {value!r}")
        return float(value)


def _database_url(raw: str, base_dir: Path) -> str:
    if raw.startswith(("postgres://", "postgresql://")):
        return raw
    if raw.startswith("sqlite:///"):
        return raw
    if raw.startswith("sqlite:") and not raw.startswith("sqlite://"):
        path = Path(raw[len("sqlite:") :])
        return "sqlite:///" + str((base_dir / path).resolve()).lstrip("/")
    raise ConfigError(
        "database.url", f"must be sqlite:PATH, sqlite:///PATH or postgres://..., got {raw!r}"
    )


# The keys a network may hold, with the value used when one is left out. Besides the example's
# network, these are the keys a network is checked against: a key a network may hold goes here.
NETWORK_KEYS: dict[str, Any] = {
    "id": Need.REQUIRED,
    "name": Need.ID,
    "ghost_localpart": "dm_{network}_{remote_id}",
    "displayname": "{name} ({network_name})",
    "remote_id_pattern": "[A-Za-z0-9._+-]{1,64}",
    "tokens": Need.REQUIRED,
    "delivery": {"mode": PULL, "url": Need.NONE, "secret": Need.NONE},
    "permissions": {"send_to": ["*"], "invites_from": ["*"]},
    "quotas": {f.name: f.default for f in fields(QuotaSettings)},
}


def _network(r: _Reader, i: int, domain: str) -> Network:
    key = f"networks[{i}]"
    raw = r.config["networks"][i]
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a mapping with id, tokens, ...")

    def field(name: str) -> Any:
        value = raw.get(name)
        if value is None and isinstance(NETWORK_KEYS[name], str):
            return NETWORK_KEYS[name]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ConfigError(f"{key}.{name}", "missing" if value is None else "is empty")
        return value

    network_id = field("id")
    if not isinstance(network_id, str) or not _NETWORK_ID.fullmatch(network_id):
        raise ConfigError(f"{key}.id", f"must match {_NETWORK_ID.pattern}, got {network_id!r}")
    template = str(field("ghost_localpart"))
    if template.count("{remote_id}") != 1:
        raise ConfigError(f"{key}.ghost_localpart", "must contain {remote_id} exactly once")
    literal = template.replace("{network}", network_id).replace("{remote_id}", "")
    if "{" in literal or "}" in literal or (literal and not is_valid_localpart(literal)):
        raise ConfigError(
            f"{key}.ghost_localpart",
            "may only use {network} and {remote_id} around the characters a-z 0-9 . _ = - /",
        )
    if not template.replace("{network}", network_id).split("{remote_id}")[0]:
        raise ConfigError(f"{key}.ghost_localpart", "needs a fixed prefix before {remote_id}")
    displayname = str(field("displayname"))
    try:
        displayname.format(name="n", remote_id="r", network_name="x")
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(
            f"{key}.displayname", f"may only use {{name}}, {{remote_id}}, {{network_name}}: {e}"
        ) from None
    try:
        pattern = re.compile(str(field("remote_id_pattern")))
    except re.error as e:
        raise ConfigError(
            f"{key}.remote_id_pattern", f"not a valid regular expression: {e}"
        ) from None
    delivery = _delivery(raw.get("delivery"), key)
    send_to = _rules(raw, key, "send_to")
    invites_from = _rules(raw, key, "invites_from")
    tokens = raw.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConfigError(f"{key}.tokens", "must be a list of at least one token")
    for j, token in enumerate(tokens):
        if token == PLACEHOLDER:
            raise ConfigError(f"{key}.tokens[{j}]", 'still "generate"; run `dmbridge generate`')
        if not isinstance(token, str) or len(token) < 16:
            raise ConfigError(f"{key}.tokens[{j}]", "must be a string of 16 characters or more")
    return Network(
        id=network_id,
        name=network_id if raw.get("name") is None else str(field("name")),
        domain=domain,
        ghost_localpart=template,
        displayname=displayname,
        remote_id_pattern=pattern,
        tokens=tuple(tokens),
        delivery=delivery,
        send_to=send_to,
        invites_from=invites_from,
        quotas=_quotas(raw.get("quotas"), key),
    )


def _quotas(raw: Any, key: str) -> QuotaSettings:
    """networks[].quotas: absent keys take the defaults; 0 turns a quota off."""
    if raw is None:
        return QuotaSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}.quotas", "must be a mapping with messages_per_second, ...")
    default = QuotaSettings()
    limits = {"messages_per_second": (0, 100_000, False), "message_burst": (1, 1_000_000, True),
              "new_dms_per_hour": (0, 1_000_000, True)}
    values: dict[str, Any] = {}
    for name, (low, high, integral) in limits.items():
        value = raw.get(name, getattr(default, name))
        kinds = (int,) if integral else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            what = "an integer" if integral else "a number"
            raise ConfigError(f"{key}.quotas.{name}",
                              f"must be {what} from {low} to {high}, got {value!r}")
        values[name] = value if integral else float(value)
    return QuotaSettings(**values)


def _delivery(raw: Any, key: str) -> Delivery:
    if raw is None:
        return Delivery()
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}.delivery", "must be a mapping with mode, url, secret")
    mode = raw.get("mode", PULL)
    if mode not in (PUSH, PULL):
        raise ConfigError(f"{key}.delivery.mode", f"must be {PUSH} or {PULL}, got {mode!r}")
    if mode == PULL:
        return Delivery()
    url = raw.get("url")
    try:
        parsed = URL(url) if isinstance(url, str) else None
        valid = parsed is not None and parsed.scheme in ("http", "https") and bool(parsed.host)
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"{key}.delivery.url", f"must be an http(s) URL, got {url!r}")
    secret = raw.get("secret")
    if secret == PLACEHOLDER:
        raise ConfigError(f"{key}.delivery.secret", 'still "generate"; run `dmbridge generate`')
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigError(f"{key}.delivery.secret", "must be a string of 16 characters or more")
    return Delivery(mode=PUSH, url=str(url), secret=secret)


def _rules(raw: dict[str, Any], key: str, name: str) -> UserRules:
    permissions = raw.get("permissions")
    if permissions is None:
        return UserRules.parse(["*"])
    if not isinstance(permissions, dict):
        raise ConfigError(f"{key}.permissions", "must be a mapping with send_to, invites_from")
    entries = permissions.get(name, ["*"])
    if not isinstance(entries, list):
        raise ConfigError(f"{key}.permissions.{name}", f"must be a list, got {entries!r}")
    try:
        return UserRules.parse(entries)
    except RuleError as e:
        raise ConfigError(f"{key}.permissions.{name}", str(e)) from None


def _check_networks(networks: list[Network], bot_localpart: str) -> None:
    seen_tokens: dict[str, str] = {}
    for i, net in enumerate(networks):
        for other in networks[:i]:
            if net.id == other.id:
                raise ConfigError(f"networks[{i}].id", f"'{net.id}' is used twice")
            a, b = net.localpart_prefix, other.localpart_prefix
            if a.startswith(b) or b.startswith(a):
                raise ConfigError(
                    f"networks[{i}].ghost_localpart",
                    f"ghost IDs could be confused with network '{other.id}' "
                    f"(prefixes '{a}', '{b}')",
                )
        for token in net.tokens:
            if token in seen_tokens and seen_tokens[token] != net.id:
                raise ConfigError(
                    f"networks[{i}].tokens", f"shares a token with '{seen_tokens[token]}'"
                )
            seen_tokens[token] = net.id
        if net.parse_ghost(f"@{bot_localpart}:{net.domain}") is not None:
            raise ConfigError(
                "appservice.bot_username", f"falls inside network '{net.id}' ghost IDs"
            )


def load_settings(config: Config) -> Settings:
    r = _Reader(config)
    domain = r.text("homeserver.domain", _DOMAIN)
    if not isinstance(config.get("networks", None), list) or not config["networks"]:
        raise ConfigError("networks", "must list at least one network")
    networks = [_network(r, i, domain) for i in range(len(config["networks"]))]
    bot = r.text("appservice.bot_username")
    if not is_valid_localpart(bot):
        raise ConfigError("appservice.bot_username", f"{bot!r} is not a valid localpart")
    _check_networks(networks, bot)
    level = r.text("logging.level").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("logging.level", f"must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    base_dir = Path(config.path).resolve().parent
    min_size = r.integer("database.min_size", 0, 1000)
    max_size = r.integer("database.max_size", 1, 1000)
    if max_size < min_size:
        raise ConfigError("database.max_size", "must not be below database.min_size")
    return Settings(
        homeserver_url=r.url("homeserver.address"),
        domain=domain,
        appservice_address=r.url("appservice.address"),
        hostname=r.text("appservice.hostname"),
        port=r.integer("appservice.port", 1, 65535),
        appservice_id=r.text("appservice.id"),
        bot_localpart=bot,
        as_token=r.text("appservice.as_token", secret=True),
        hs_token=r.text("appservice.hs_token", secret=True),
        database_url=_database_url(r.text("database.url"), base_dir),
        db_min_size=min_size,
        db_max_size=max_size,
        max_body_bytes=r.integer("api.max_body_bytes", 1024, 64 * 1024 * 1024),
        creation_timeout=r.number("dm.creation_timeout", 1, 3600),
        networks=Networks(networks),
        log_level=level,
        on_leave=_on_leave(r),
        encryption=_encryption(r),
        pickle_key=_pickle_key(r),
        delivery=DeliverySettings(
            max_attempts=r.integer("delivery.max_attempts", 1, 1000),
            max_age=r.number("delivery.max_age", 1, 90 * 86400),
            initial_backoff=r.number("delivery.initial_backoff", 0.01, 3600),
            max_backoff=r.number("delivery.max_backoff", 0.01, 86400),
            timeout=r.number("delivery.timeout", 0.1, 600),
            concurrency=r.integer("delivery.concurrency", 1, 256),
            pull_ack_timeout=r.number("delivery.pull_ack_timeout", 1, 86400),
            pull_max_wait=r.number("delivery.pull_max_wait", 1, 600),
        ),
        media=MediaSettings(
            max_upload_bytes=r.integer("media.max_upload_bytes", 1024, 4 * 1024**3),
            link_ttl=r.number("media.link_ttl", 10, 30 * 86400),
            public_url=_public_url(r),
        ),
        listener=_listener(r),
        rate_limits=_rate_limits(r),
        admin_notices=_admin_notices(r),
        retention=RetentionSettings(
            **{key: _days(r, f"retention.{key}") for key in RETENTION_KEYS}),
        log_format=_log_format(r),
        metrics=_metrics(r),
    )


def _log_format(r: _Reader) -> str:
    value = r.text("logging.format")
    if value not in LOG_FORMATS:
        raise ConfigError("logging.format", f"must be text or json, got {value!r}")
    return value


def _metrics(r: _Reader) -> MetricsSettings:
    enabled = r.get("metrics.enabled")
    if not isinstance(enabled, bool):
        raise ConfigError("metrics.enabled", f"must be true or false, got {enabled!r}")
    raw = r.config.get("metrics.listen", None)
    if raw is None or raw == "":
        return MetricsSettings(enabled=enabled)
    listen = _host_port(raw) if isinstance(raw, str) else None
    if listen is None:
        raise ConfigError("metrics.listen", f'must be "" or HOST:PORT (port 1 to 65535), '
                          f"got {raw!r}")
    if listen[1] == r.config.get("appservice.port", None) and _same_host(
            listen[0], r.config.get("appservice.hostname", None)):
        raise ConfigError("metrics.listen", f"{raw!r} is the bridge's own listener; leave it "
                          '"" to serve /metrics there')
    return MetricsSettings(enabled=enabled, listen=listen)


def _same_host(one: str, other: object) -> bool:
    wildcards = ("0.0.0.0", "::")
    return one == other or one in wildcards or other in wildcards


def _host_port(value: str) -> tuple[str, int] | None:
    """``127.0.0.1:9100``, ``[::1]:9100`` or ``0.0.0.0:9100`` as (host, port); None if not."""
    value = value.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:
            return None  # an IPv6 address goes in brackets
    if not sep or not host or not (port.isascii() and port.isdigit()):
        return None
    if not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def _listener(r: _Reader) -> ListenerSettings:
    """appservice.listener: the HTTP listener's timeouts and bounds."""
    key = "appservice.listener."
    return ListenerSettings(
        idle_timeout=r.number(key + "idle_timeout", 1, 86400),
        header_timeout=r.number(key + "header_timeout", 1, 3600),
        body_stall_timeout=r.number(key + "body_stall_timeout", 1, 3600),
        body_timeout=r.number(key + "body_timeout", 1, 86400),
        max_connections=r.integer(key + "max_connections", 0, 1_000_000),
        max_uploads_per_network=r.integer(key + "max_uploads_per_network", 1, 1000),
    )


def _rate_limits(r: _Reader) -> RateLimitSettings:
    request_wait = r.number("rate_limits.request_wait", 0, 120)
    if request_wait >= r.number("dm.creation_timeout", 1, 3600):
        # A request still waiting to create its room would look abandoned to the others.
        raise ConfigError("rate_limits.request_wait", "must be below dm.creation_timeout")
    return RateLimitSettings(
        request_wait=request_wait,
        background_wait=r.number("rate_limits.background_wait", 1, 240),
        rooms_per_second=r.number("rate_limits.room_creation.per_second", 0.001, 1000),
        room_burst=r.integer("rate_limits.room_creation.burst", 1, 10_000),
    )


_USER_ID = re.compile(r"@[^:\s]+:\S+")
_ROOM_ID = re.compile(r"![^:\s]+(:\S+)?")


def _admin_notices(r: _Reader) -> NoticeSettings:
    found = {}
    for key, pattern, what in (("user", _USER_ID, "a user ID (@user:server)"),
                               ("room", _ROOM_ID, "a room ID (!room:server)")):
        value = r.config.get(f"admin_notices.{key}", None) or ""
        if not isinstance(value, str) or (value and not pattern.fullmatch(value)):
            raise ConfigError(f"admin_notices.{key}", f"must be empty or {what}, got {value!r}")
        found[key] = value
    if found["user"] and found["room"]:
        raise ConfigError("admin_notices.room", "set admin_notices.user or room, not both")
    return NoticeSettings(
        user=found["user"], room=found["room"],
        repeat_window=r.number("admin_notices.repeat_window", 0, 7 * 86400),
        outage_after=r.number("admin_notices.outage_after", 0, 7 * 86400),
    )


def _days(r: _Reader, key: str) -> float:
    """Days to keep something: 0 (for ever), or at least one day (a retry or a reply within
    hours must still find what it points at)."""
    value = r.number(key, 0, 36500)
    if 0 < value < 1:
        raise ConfigError(key, f"must be 0 (keep for ever) or from 1 to 36500, got {value!r}")
    return value


def _public_url(r: _Reader) -> str:
    """media.public_url, or appservice.address when it is left empty."""
    if r.config.get("media.public_url", None) in (None, ""):
        return r.url("appservice.address")
    return r.url("media.public_url")


def _encryption(r: _Reader) -> str:
    value = r.get("dm.encryption")
    if value is False:  # YAML 1.1 readers take a bare off for false
        value = "off"
    if value not in ENCRYPTION:
        raise ConfigError("dm.encryption",
                          f"must be one of {', '.join(ENCRYPTION)}, got {value!r}")
    return value


def _pickle_key(r: _Reader) -> str:
    """dm.pickle_key, needed (and checked) only when encryption is on."""
    if _encryption(r) == "off":
        return ""
    value = r.text("dm.pickle_key", secret=True)
    if len(value) < PICKLE_KEY_MIN:
        raise ConfigError("dm.pickle_key", f"must be {PICKLE_KEY_MIN} characters or more"
                          " (`dmbridge generate` fills in a random one)")
    return value


def _on_leave(r: _Reader) -> str:
    value = r.text("dm.on_leave")
    if value not in ON_LEAVE:
        raise ConfigError("dm.on_leave", f"must be one of {', '.join(ON_LEAVE)}, got {value!r}")
    return value


def check_shape(config: Config, path: str, environ: Mapping[str, str] | None = None) -> None:
    """Every key of the file, and of the environment's overrides, must be known, and sections
    must be mappings (networks a list) for the upgrade to merge them: else ConfigErrors, one
    line for each key."""
    if not isinstance(config._data, dict):
        raise ConfigError("(file)", f"{path} is not a YAML mapping")
    keys = config.known_keys()
    findings = check_file(config._data, keys, path)
    findings += check_env(environ or {}, keys, ENV_PREFIX)
    if findings:
        raise ConfigErrors.of(findings)


def read_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """The file, checked and upgraded in memory from the packaged example (keeping the user's
    values); ``environ``'s overrides are checked too, not applied."""
    config = Config(path)
    config.load()
    check_shape(config, str(path), environ)
    config.update(save=False)
    return config


def open_config(path: str | Path, environ: Mapping[str, str] | None = None, *,
                upgrade: bool = False) -> Settings:
    """Load, check the keys, upgrade, apply env overrides, validate.

    Only with ``upgrade`` (``dmbridge run``) is the upgraded file written back, and only once
    the settings are valid and if it changed: commands that just read the config leave it as
    it was, byte for byte. A file that cannot be rewritten (owned by root and read-only to the
    service user, say) is used as upgraded in memory. Overrides are never written.
    """
    environ = os.environ if environ is None else environ
    config = read_config(path, environ)
    upgraded = config.text()
    config.apply_env(environ)
    settings = load_settings(config)
    if upgrade:
        try:
            config.save(upgraded)
        except OSError as e:
            log.warning("%s: not upgraded in place (%s); the upgraded settings are used, the "
                        "file is left as it was", path, e.strerror or e)
    return settings


def write_registration(settings: Settings, path: str | Path) -> None:
    """Write the registration, owner-only (it holds both tokens), keeping its owner."""
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    stream = io.StringIO()
    yaml.dump(settings.registration(), stream)
    replace_file(Path(path), stream.getvalue(), mode=PRIVATE)
