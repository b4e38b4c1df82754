"""The dmbridge command line: generate, run, demo, send, list-dms."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp

from .config import (
    Config,
    ConfigError,
    check_shape,
    load_settings,
    open_config,
    write_registration,
)
from .logfilter import limit_handlers
from .startup import StartupError

# Whatever the bridge writes holds secrets or messages: the config, the registration, the
# SQLite database and its -wal and -shm. Owner-only unless an admin chose otherwise.
UMASK = 0o077


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # A flood of clients must not flood the log: repeated lines are counted, then summarised.
    limit_handlers(logging.getLogger().handlers)
    # mautrix logs every request at DEBUG on these; keep them quiet unless asked.
    if level != "DEBUG":
        logging.getLogger("mau").setLevel(logging.WARNING)


def generate(
    config_path: Path, registration_path: Path, overrides: dict[str, Any]
) -> tuple[Config, Path]:
    """Write (or upgrade) the config with fresh tokens, and the registration from it.

    An existing config keeps its owner and mode and is written only if it changed; the
    registration is written owner-only, keeping its owner.
    """
    config = Config(config_path)
    if config_path.exists():
        config.load()
        check_shape(config, str(config_path))
    else:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config.load_example()
    config.update(save=False)
    for key, value in overrides.items():
        if value is not None:
            config[key] = value
    config.fill_placeholders()
    settings = load_settings(config)
    try:
        path = config_path
        config.save()
        path = registration_path
        write_registration(settings, registration_path)
    except OSError as e:
        raise ConfigError("(file)", f"{path} cannot be written: {e.strerror or e}; it is left "
                          "as it was") from None
    return config, registration_path


def cmd_generate(args: argparse.Namespace) -> int:
    overrides = {
        "homeserver.address": args.homeserver,
        "homeserver.domain": args.domain,
        "appservice.address": args.address,
        "appservice.port": args.port,
        "database.url": args.database,
    }
    generate(args.config, args.registration, overrides)
    print(f"wrote {args.config} and {args.registration}")
    print(f"next: add {args.registration.resolve()} to app_service_config_files in the "
          "homeserver's config, restart the homeserver, then run `dmbridge run`")
    return 0


async def _run(config_path: Path) -> int:
    from .bridge import Bridge

    settings = open_config(config_path, upgrade=True)
    _setup_logging(settings.log_level)
    bridge = Bridge(settings)
    try:
        await bridge.start()
    except Exception as e:
        # A StartupError's one line says it all; anything else shows its traceback at DEBUG.
        trace = settings.log_level == "DEBUG" and not isinstance(e, StartupError)
        logging.getLogger("dmbridge").error("could not start: %s", e, exc_info=trace)
        try:  # what did start (the database's thread, sockets) must not keep the process alive
            await bridge.stop()
        except Exception as again:
            logging.getLogger("dmbridge").debug("cleaning up after the failed start: %r", again)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await bridge.stop()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    code = asyncio.run(_run(args.config))
    if code != 0:
        _exit_if_stuck(code)
    return code


def _exit_if_stuck(code: int) -> None:
    """After a failed start, a thread a library left running must not keep the process alive
    (systemd would wait forever instead of restarting it)."""
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if stuck:
        logging.getLogger("dmbridge").debug("exiting past threads still running: %s", stuck)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _setup_logging("INFO")
    return asyncio.run(run_demo(args.workdir.resolve(), once=args.once))


async def _api(config_path: Path, method: str, path: str, network: str | None,
               body: dict[str, Any] | None = None, query: dict[str, str] | None = None,
               ) -> list[tuple[str, int, Any]]:
    """Call the running bridge's API with the token of one network (or of each)."""
    settings = open_config(config_path)
    host = "127.0.0.1" if settings.hostname in ("0.0.0.0", "::") else settings.hostname
    base = f"http://{host}:{settings.port}/_dmbridge/v1"
    networks = [settings.networks.get(network)] if network else list(settings.networks)
    results = []
    async with aiohttp.ClientSession() as session:
        for net in networks:
            url = base + path.format(network=net.id)
            headers = {"Authorization": f"Bearer {net.tokens[0]}"}
            try:
                async with session.request(method, url, json=body, params=query,
                                           headers=headers) as resp:
                    results.append((net.id, resp.status, await resp.json(content_type=None)))
            except aiohttp.ClientConnectionError as e:
                raise SystemExit(f"dmbridge: the bridge is not reachable at {base}: {e}") from e
    return results


def cmd_send(args: argparse.Namespace) -> int:
    import uuid

    body = {"sender": args.sender, "recipient": args.to, "text": args.text}
    if args.sender_name:
        body["sender_name"] = args.sender_name
    message_id = args.message_id or f"cli-{uuid.uuid4()}"
    [(_, status, data)] = asyncio.run(_api(
        args.config, "PUT", f"/networks/{{network}}/messages/{message_id}", args.network, body
    ))
    print(json.dumps(data, indent=2))
    return 0 if status == 200 else 1


def _each_ok(results: list[tuple[str, int, Any]]) -> tuple[list[tuple[str, Any]], int]:
    """The answers of the networks that succeeded; failures go to stderr. And the exit code."""
    ok = []
    for network, status, data in results:
        if status == 200:
            ok.append((network, data))
        else:
            print(f"{network}: {status} {data}", file=sys.stderr)
    return ok, 0 if len(ok) == len(results) else 1


def cmd_list_dms(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("user_id", args.user), ("remote_id", args.remote_id)) if v}
    if args.remote_id and not args.network:
        raise SystemExit("dmbridge: --remote-id needs --network")
    ok, code = _each_ok(asyncio.run(_api(args.config, "GET", "/networks/{network}/dms",
                                         args.network, query=query)))
    for network, data in ok:
        for dm in data["dms"]:
            print(f"{network}\t{dm['remote_id']}\t{dm['user_id']}\t{dm['room_id']}\t"
                  f"{dm['user_membership']}")
    return code


def cmd_dead_letters(args: argparse.Namespace) -> int:
    if args.retry or args.retry_all:
        body: dict[str, Any] = {"all": True} if args.retry_all else {"ids": args.retry}
        ok, code = _each_ok(asyncio.run(_api(
            args.config, "POST", "/networks/{network}/dead-letters/retry", args.network, body
        )))
        for network, data in ok:
            if data["requeued"]:
                print(f"{network}: queued again: {' '.join(map(str, data['requeued']))}")
        return code
    ok, code = _each_ok(asyncio.run(_api(args.config, "GET", "/networks/{network}/dead-letters",
                                         args.network, query={"limit": "1000"})))
    for network, data in ok:
        for item in data["dead_letters"]:
            print(f"{network}\t{item['id']}\t{item['type']}\t{item['remote_id']}\t"
                  f"{item['user_id']}\t{item['attempts']}\t{item['error']}")
    return code


async def _clear_declined(config_path: Path, network_id: str, remote_id: str, user: str) -> int:
    from .db import Stores, create_database, start_database
    from .errors import BridgeError
    from .lifecycle import clear_declined

    settings = open_config(config_path)
    db = create_database(settings.database_url, db_args={},
                         log=logging.getLogger("dmbridge.db"))
    try:
        await start_database(db, settings.database_url)
    except StartupError as e:
        print(f"dmbridge: {e}", file=sys.stderr)
        return 1
    try:
        await clear_declined(Stores.over(db), settings.networks.get(network_id), remote_id, user)
    except BridgeError as e:
        print(f"dmbridge: {e.message}", file=sys.stderr)
        return 1
    finally:
        await db.stop()
    print(f"{user} may be written to by {network_id} user {remote_id} again; the next message "
          "opens a new DM")
    return 0


def cmd_clear_declined(args: argparse.Namespace) -> int:
    return asyncio.run(_clear_declined(args.config, args.network, args.remote_id, args.user))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmbridge", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", type=Path, default=Path("config.yaml"),
                        help="config file (default: %(default)s)")

    g = sub.add_parser("generate", help="write config.yaml (fresh tokens) and registration.yaml",
                       description="Write (or upgrade) the config from the packaged example, fill "
                       "in fresh tokens, and write the registration file for the homeserver.")
    with_config(g)
    g.add_argument("-r", "--registration", type=Path, default=Path("registration.yaml"),
                   help="registration file to write (default: %(default)s)")
    g.add_argument("--homeserver", help="homeserver.address: the client-server API URL")
    g.add_argument("--domain", help="homeserver.domain: the server name in user IDs")
    g.add_argument("--address", help="appservice.address: the URL the homeserver reaches us at")
    g.add_argument("--port", type=int, help="appservice.port: the port to listen on")
    g.add_argument("--database", help="database.url")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", help="run the bridge", description="Run the bridge until SIGINT "
                       "or SIGTERM.")
    with_config(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="run a local throwaway homeserver, the bridge, and a demo DM",
                       description="Install and start a throwaway Synapse on 127.0.0.1, run the "
                       "bridge on SQLite, create the Matrix user 'alice', route a DM to her, and "
                       "print how to log in and see it.")
    d.add_argument("--workdir", type=Path, default=Path("demo-data"),
                   help="where the demo keeps its homeserver, config and database "
                   "(default: %(default)s)")
    d.add_argument("--once", action="store_true", help="exit after the demo DM instead of "
                   "running until Ctrl-C")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("send", help="send a test DM through the running bridge",
                       description="Send a DM from a remote user to a Matrix user through the "
                       "running bridge's API, with the network's first token.")
    with_config(s)
    s.add_argument("--network", required=True, help="network ID")
    s.add_argument("--sender", required=True, help="the remote user's ID on that network")
    s.add_argument("--sender-name", help="the remote user's display name")
    s.add_argument("--to", required=True, help="the Matrix user ID to write to")
    s.add_argument("--text", required=True, help="the message text")
    s.add_argument("--message-id", help="idempotency key (default: a fresh one)")
    s.set_defaults(func=cmd_send)

    ls = sub.add_parser("list-dms", help="list DMs known to the running bridge",
                        description="List active DMs, one per line: network, remote ID, Matrix "
                        "user, room, the user's membership.")
    with_config(ls)
    ls.add_argument("--network", help="only this network")
    ls.add_argument("--user", help="only DMs with this Matrix user")
    ls.add_argument("--remote-id", help="only DMs with this remote user (needs --network)")
    ls.set_defaults(func=cmd_list_dms)

    dl = sub.add_parser("dead-letters", help="list or retry undeliverable replies and notices",
                        description="List dead letters (items a platform never accepted), one "
                        "per line: network, id, type, remote ID, Matrix user, attempts, last "
                        "error. With --retry or --retry-all, queue them for delivery again.")
    with_config(dl)
    dl.add_argument("--network", help="only this network")
    dl.add_argument("--retry", type=int, nargs="+", metavar="ID", help="queue these again")
    dl.add_argument("--retry-all", action="store_true", help="queue every dead letter again")
    dl.set_defaults(func=cmd_dead_letters)

    cd = sub.add_parser("clear-declined", help="let a network write to a user who declined",
                        description="Lift a decline (the user rejected the invite, or kicked or "
                        "banned the contact): the next message from the platform opens a new DM. "
                        "Works on the database directly, with or without the bridge running.")
    with_config(cd)
    cd.add_argument("--network", required=True, help="network ID")
    cd.add_argument("--remote-id", required=True, help="the remote user's ID on that network")
    cd.add_argument("--user", required=True, help="the Matrix user who declined")
    cd.set_defaults(func=cmd_clear_declined)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    umask = os.umask(UMASK)
    try:
        result: int = args.func(args)
    except ConfigError as e:
        for line in str(e).splitlines():  # one for each wrong key
            print(f"dmbridge: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        os.umask(umask)  # main() may run inside another program (tests)
    return result


if __name__ == "__main__":
    sys.exit(main())
