"""The `bnlab` command: start the API, a worker, both, or apply migrations.

`bnlab worker` execs Celery on the `workers` package by module name, so the service never imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from service.config import get_settings

SHUTDOWN_GRACE_S = 30


def worker_command() -> list[str]:
    settings = get_settings()
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--loglevel", settings.log_level.upper(),
        "--queues", settings.queue,
        "--concurrency", str(settings.worker_concurrency),
        # Unique per worker process, so that runs held by one node can be told from another's.
        "--hostname", f"bnlab-{os.getpid()}@%h",
        # Gossip, mingle and broker heartbeats are cluster chatter bnlab does not use.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def migrate() -> None:
    from service.migrate import upgrade_to_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    print(f"database ready: {settings.sqlalchemy_url}")  # noqa: T201 - CLI output


def serve_api() -> None:
    import uvicorn

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
    )


def run_worker() -> None:
    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    command = worker_command()
    os.execv(command[0], command)


def run_all() -> None:
    """API and one worker in the foreground; Ctrl-C (or SIGTERM) stops both cleanly."""
    migrate()
    api = subprocess.Popen([sys.executable, "-m", "service.cli", "api"])
    worker = subprocess.Popen(worker_command())
    children = [api, worker]

    def stop(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None and signum != signal.SIGINT:  # Ctrl-C already reached the group
                child.send_signal(signal.SIGTERM)
        raise SystemExit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        os.wait()  # the first child to exit ends the pair
    except SystemExit:
        pass
    finally:
        _stop_children(children)


def _stop_children(children: Sequence[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()  # reap it: a killed child left unwaited stays a zombie


def create_key(args: argparse.Namespace) -> None:
    from service.auth import KeyFileError
    from service.auth import create_key as append_key

    path = get_settings().api_keys_file
    if path is None:
        raise SystemExit("set BNLAB_API_KEYS_FILE to the keys file first (it is created if missing)")
    try:
        key = append_key(path, scopes=args.scopes, name=args.name)
    except KeyFileError as exc:
        raise SystemExit(f"bnlab keys create: {exc}") from exc
    print(key)  # noqa: T201 - shown once: only its hash is stored
    print(f"# key '{args.name}' ({args.scopes}) added to {path}; it is not shown again", file=sys.stderr)  # noqa: T201


COMMANDS = {
    "api": (serve_api, "serve the HTTP API"),
    "worker": (run_worker, "start one Celery worker"),
    "migrate": (migrate, "apply database migrations"),
    "run": (run_all, "migrate, then serve the API and one worker until Ctrl-C"),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bnlab", description="Train and serve BatchNorm / no-BatchNorm models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="append a new key to BNLAB_API_KEYS_FILE and print it once")
    create.add_argument("--scopes", required=True, help="comma-separated: read, train, admin")
    create.add_argument("--name", required=True, help="a name for the key (letters, digits, . _ -)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=get_settings().log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "keys":
        create_key(args)
    else:
        COMMANDS[args.command][0]()


if __name__ == "__main__":
    main()
