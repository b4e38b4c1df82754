"""The dmbridge command line: set up, run and look after a dmbridge bridge."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from .config import (
    Config,
    ConfigError,
    check_shape,
    load_settings,
    open_config,
    write_registration,
)
from .errors import BridgeError
from .logfilter import limit_handlers
from .logformat import formatter
from .requestid import RequestIdFilter
from .startup import StartupError

if TYPE_CHECKING:
    from .bridge import Bridge

# Whatever the bridge writes holds secrets or messages: the config, the registration, the
# SQLite database and its -wal and -shm. Owner-only unless an admin chose otherwise.
UMASK = 0o077


class CommandError(Exception):
    """A command cannot do what it was asked; ``str(e)`` says why in one line."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    # Lines a request causes carry its ID ([req-...] in text, request_id in JSON).
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])
    # A flood of clients must not flood the log: repeated lines are counted, then summarised.
    limit_handlers(logging.getLogger().handlers)
    # mautrix logs every request at DEBUG on these; keep them quiet unless asked.
    if level != "DEBUG":
        logging.getLogger("mau").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its values (message text too) from its own thread,
    # where no request ID reaches; the time spent in the database is in the metrics instead.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)


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
        config.load_example()
    config.update(save=False)
    for key, value in overrides.items():
        if value is not None:
            config[key] = value
    config.fill_placeholders()
    settings = load_settings(config)
    step = ""
    try:
        for folder in dict.fromkeys((config_path.parent, registration_path.parent)):
            step = f"the folder {folder} cannot be created"
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder")
            folder.mkdir(parents=True, exist_ok=True)
        step = f"{config_path} cannot be written"
        config.save()
        step = f"{registration_path} cannot be written"
        write_registration(settings, registration_path)
    except OSError as e:
        raise ConfigError("(file)", f"{step}: {e.strerror or e}") from None
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
    _setup_logging(settings.log_level, settings.log_format)
    bridge = Bridge(settings)
    # SIGTERM or Ctrl-C stop the bridge whenever they come, while it starts too (the first
    # check of the homeserver can take a while): what started is stopped in order.
    stop = asyncio.Event()
    signals: list[int] = []

    def on_signal(sig: int) -> None:
        signals.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    starting, stopping = asyncio.ensure_future(bridge.start()), asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        logging.getLogger("dmbridge").info("stopped while starting")
        await _stop_after_failed_start(bridge)
        return 130 if signals[:1] == [signal.SIGINT] else 0
    try:
        starting.result()
    except asyncio.CancelledError:
        await _stop_after_failed_start(bridge)
        raise
    except Exception as e:
        # A StartupError's one line says it all; anything else shows its traceback at DEBUG.
        trace = settings.log_level == "DEBUG" and not isinstance(e, StartupError)
        logging.getLogger("dmbridge").error("could not start: %s", e, exc_info=trace)
        bridge.notices.startup_problem(f"could not start: {e}")
        await _stop_after_failed_start(bridge)
        return 1
    # A check after start may find what only the config can fix: then the bridge ends too.
    failed = asyncio.ensure_future(bridge.failed())
    await asyncio.wait([stopping, failed], return_when=asyncio.FIRST_COMPLETED)
    code = 1 if failed.done() else 0
    if code:
        logging.getLogger("dmbridge").error("could not start: %s", failed.result())
    stopping.cancel()
    failed.cancel()
    await bridge.stop()
    return code


async def _stop_after_failed_start(bridge: Bridge) -> None:
    try:  # what did start (the database's thread, sockets) must not keep the process alive
        await bridge.stop()
    except Exception as again:
        logging.getLogger("dmbridge").debug("cleaning up after the failed start: %r", again)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        code = asyncio.run(_run(args.config))
    except KeyboardInterrupt:
        _fail("interrupted while starting", 130)
        code = 130
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
                    raw = await resp.read()
                    status = resp.status
            except aiohttp.ClientError as e:
                raise CommandError(f"the bridge is not reachable at {base} (is `dmbridge run` "
                                   f"running with {config_path}?): {e}") from None
            try:
                results.append((net.id, status, json.loads(raw)))
            except ValueError:  # something else listens there
                raise CommandError(f"{url} answered {status} without JSON: is that the bridge "
                                   "(appservice.hostname, appservice.port)?") from None
    return results


def _problem(data: Any) -> str:
    """An API error body in one line."""
    if isinstance(data, dict) and "errcode" in data:
        return f"{data['errcode']}: {data.get('error', '')}"
    return json.dumps(data)


def cmd_send(args: argparse.Namespace) -> int:
    import uuid

    body = {"sender": args.sender, "recipient": args.to, "text": args.text}
    if args.sender_name:
        body["sender_name"] = args.sender_name
    message_id = args.message_id or f"cli-{uuid.uuid4()}"
    [(_, status, data)] = asyncio.run(_api(
        args.config, "PUT", f"/networks/{{network}}/messages/{message_id}", args.network, body
    ))
    if status != 200:
        raise CommandError(f"{args.network}: {status} {_problem(data)}")
    print(json.dumps(data, indent=2))
    return 0


def _each_ok(results: list[tuple[str, int, Any]]) -> tuple[list[tuple[str, Any]], int]:
    """The answers of the networks that succeeded; failures go to stderr. And the exit code."""
    ok = []
    for network, status, data in results:
        if status == 200:
            ok.append((network, data))
        else:
            print(f"dmbridge: {network}: {status} {_problem(data)}", file=sys.stderr)
    return ok, 0 if len(ok) == len(results) else 1


def cmd_list_dms(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("user_id", args.user), ("remote_id", args.remote_id)) if v}
    if args.remote_id and not args.network:
        raise CommandError("--remote-id needs --network", code=2)
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


def cmd_forget(args: argparse.Namespace) -> int:
    if (args.matrix_user is None) == (args.network is None and args.remote_id is None):
        raise CommandError("forget takes either --matrix-user or --network with --remote-id",
                           code=2)
    if args.matrix_user is None and (args.network is None or args.remote_id is None):
        raise CommandError("--network and --remote-id go together", code=2)
    from .forget import command

    return asyncio.run(command(open_config(args.config), args.matrix_user, args.network,
                               args.remote_id, yes=args.yes))
def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return asyncio.run(run_doctor(args.config, args.registration))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmbridge", description=__doc__,
        epilog="`dmbridge COMMAND --help` describes a command and its options. Exit status: 0 "
        "done, 1 failed (one line on stderr says why), 2 bad arguments or config, 130 "
        "interrupted.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", type=Path, default=Path("config.yaml"),
                        help="the bridge's config file, as written by `dmbridge generate` "
                        "(default: %(default)s)")

    g = sub.add_parser("generate", help="write config.yaml (fresh tokens) and registration.yaml",
                       description="Write (or upgrade) the config from the packaged example, fill "
                       "in fresh tokens, and write the registration file for the homeserver.")
    with_config(g)
    g.add_argument("-r", "--registration", type=Path, default=Path("registration.yaml"),
                   help="registration file to write (default: %(default)s)")
    g.add_argument("--homeserver", metavar="URL",
                   help="homeserver.address: the homeserver's client-server API URL")
    g.add_argument("--domain", help="homeserver.domain: the server name in user IDs")
    g.add_argument("--address", metavar="URL",
                   help="appservice.address: the URL the homeserver reaches the bridge at")
    g.add_argument("--port", type=int, help="appservice.port: the port the bridge listens on")
    g.add_argument("--database", metavar="URL", help="database.url: sqlite:PATH (relative to "
                   "the config's folder) or postgres://user:password@host/dbname")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", help="run the bridge", description="Run the bridge until SIGINT "
                       "or SIGTERM. The config file is upgraded in place (new keys with their "
                       "comments) when it can be written.")
    with_config(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="run a local throwaway homeserver, the bridge, and a demo DM",
                       description="Install and start a throwaway Synapse on 127.0.0.1, run the "
                       "bridge on SQLite, create the Matrix user 'alice', route a DM to her, and "
                       "print how to log in, send another and read her replies. Keeps running "
                       "until Ctrl-C.")
    d.add_argument("--workdir", type=Path, default=Path("demo-data"),
                   help="where the demo keeps its homeserver, config and database "
                   "(default: %(default)s)")
    d.add_argument("--once", action="store_true", help="stop the bridge and homeserver after "
                   "the demo DM instead of running until Ctrl-C")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("send", help="send a test DM through the running bridge",
                       description="Send a DM from a remote user to a Matrix user through the "
                       "running bridge's API, with the network's first token.")
    with_config(s)
    s.add_argument("--network", required=True, help="the network ID (networks[].id) to send as")
    s.add_argument("--sender", required=True, help="the remote user's ID on that network")
    s.add_argument("--sender-name", help="the remote user's display name")
    s.add_argument("--to", required=True, help="the Matrix user ID to write to")
    s.add_argument("--text", required=True, help="the message text")
    s.add_argument("--message-id", help="the message's ID on the network, its idempotency key: "
                   "sending the same ID again sends nothing new (default: a fresh one)")
    s.set_defaults(func=cmd_send)

    ls = sub.add_parser("list-dms", help="list DMs known to the running bridge",
                        description="List active DMs, one per line: network, remote ID, Matrix "
                        "user, room, the user's membership. Asks the running bridge's API, with "
                        "each network's first token.")
    with_config(ls)
    ls.add_argument("--network", help="only this network")
    ls.add_argument("--user", help="only DMs with this Matrix user")
    ls.add_argument("--remote-id", help="only DMs with this remote user (needs --network)")
    ls.set_defaults(func=cmd_list_dms)

    dl = sub.add_parser("dead-letters", help="list or retry undeliverable replies and notices",
                        description="List dead letters (items a platform never accepted), one "
                        "per line: network, id, type, remote ID, Matrix user, attempts, last "
                        "error. With --retry or --retry-all, queue them for delivery again. "
                        "Asks the running bridge's API, with each network's first token.")
    with_config(dl)
    dl.add_argument("--network", help="only this network")
    retry = dl.add_mutually_exclusive_group()
    retry.add_argument("--retry", type=int, nargs="+", metavar="ID",
                       help="queue these dead letters (IDs from the list) again")
    retry.add_argument("--retry-all", action="store_true",
                       help="queue every dead letter (of --network, or of all) again")
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

    fg = sub.add_parser("forget", help="forget a Matrix user or a remote user and their DMs",
                        description="Forget a Matrix user (--matrix-user) or a network's remote "
                        "user (--network, --remote-id): each DM's platform gets a dm.forgotten "
                        "notice, the ghost leaves and forgets the rooms, and the bridge deletes "
                        "its DMs, message maps, history, outbox items, invites and declines (and "
                        "a remote user's ghost profile and avatar upload). Works on the database "
                        "and the homeserver directly, with or without the bridge running. Asks "
                        "first unless --yes; prints what was removed.")
    with_config(fg)
    fg.add_argument("--matrix-user", metavar="USER_ID", help="the Matrix user to forget")
    fg.add_argument("--network", help="the network of the remote user to forget")
    fg.add_argument("--remote-id", help="the remote user's ID on that network")
    fg.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    fg.set_defaults(func=cmd_forget)
    dr = sub.add_parser("doctor", help="check the set-up: config, database, homeserver, "
                        "registration, webhooks, file modes",
                        description="Run every check of the bridge's set-up and print one line "
                        "per check, 'ok' or 'problem' with the cause and the fix. Exit status 1 "
                        "if any check found a problem.")
    with_config(dr)
    dr.add_argument("-r", "--registration", type=Path, help="the registration file to compare "
                    "with the config (default: registration.yaml beside the config, if there)")
    dr.set_defaults(func=cmd_doctor)
    return p


def _version() -> str:
    try:
        return metadata.version("dmbridge")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. What a user can cause or fix (a bad argument, config or file, a bridge
    that is not running, Ctrl-C) ends in one line on stderr and a non-zero status; anything
    else is a bug and keeps its traceback."""
    args = parser().parse_args(argv)
    umask = os.umask(UMASK)
    try:
        result: int = args.func(args)
    except ConfigError as e:
        for line in str(e).splitlines()[:-1]:  # one for each wrong key
            _fail(line, 2)
        return _fail(str(e).splitlines()[-1], 2)
    except CommandError as e:
        return _fail(str(e), e.code)
    except StartupError as e:
        return _fail(str(e), 1)
    except BridgeError as e:
        return _fail(e.message, 1)
    except OSError as e:
        return _fail(_os_problem(e), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        os.umask(umask)  # main() may run inside another program (tests)
    return result


def _fail(message: str, code: int) -> int:
    print(f"dmbridge: {message}", file=sys.stderr)
    return code


def _os_problem(e: OSError) -> str:
    """A file or socket failure in one line, naming the file."""
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what


if __name__ == "__main__":
    sys.exit(main())
