"""The `bnlab` command: the server roles (api, worker, run, migrate, keys) and the user's commands
(submit, runs, show, cancel, predict, experiment, report; in service.client.commands), which talk to a
bnlab API over HTTP.

`bnlab worker` execs Celery on the `workers` package by module name, so the service never imports it.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import click

from service.client.cards import cards
from service.client.commands import register_client_commands
from service.client.export import export
from service.client.searches import search
from service.config import get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.supervisor import Start

SHUTDOWN_GRACE_S = 30
# Connections the kernel holds for a process before it accepts them (uvicorn's own default).
LISTEN_BACKLOG = 2048


def worker_command() -> list[str]:
    settings = get_settings()
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--loglevel", settings.log_level.upper(),
        "--queues", settings.queue,
        "--concurrency", str(settings.training_processes),
        # Unique per start, so that runs held by one node can be told from another's and a restarted
        # worker may take back what its predecessor handed back at shutdown. The PID alone is not: in a
        # container the worker is PID 1 on every start, and a restarted container keeps its hostname.
        "--hostname", f"bnlab-{os.getpid()}-{os.urandom(3).hex()}@%h",
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
    """Serve the app service.main creates from BNLAB_API_PROCESSES processes."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.api_process_count == 1:
        _serve(None)
        return
    from service.main import create_app
    from service.supervisor import Supervisor

    # Built once, here: each process is a fork of this one, as `bnlab run`'s are.
    sys.exit(Supervisor.of(api_starters(create_app()), grace_s=SHUTDOWN_GRACE_S).run())


def api_starters(app: FastAPI) -> dict[str, Start]:
    """The supervisor's starters of the API processes, each a fork of this process serving `app`
    (whose start-up heap is frozen here, before the forks)."""
    from service.serving.server import NAMING
    from service.supervisor import forked

    settings = get_settings()
    count = settings.api_process_count
    if count == 1:
        freeze_startup_heap()
        return {"api": forked(lambda: _serve(app))}
    refuse_a_taken_port(settings.host, settings.port)
    NAMING.share_with_forks(count)
    freeze_startup_heap()
    return {f"api-{slot + 1}": forked(partial(_serve, app, naming_slot=slot)) for slot in range(count)}


def _serve(app: FastAPI | None, *, naming_slot: int | None = None) -> None:
    """One API process serving `app` (built and frozen by api_starters), or the app it builds: on the
    port alone, or (`naming_slot`, its place among the API processes forked from one parent) sharing
    it with the others."""
    import uvicorn

    from service.serving.server import NAMING
    from service.telemetry import logging_config

    settings = get_settings()

    def served() -> FastAPI:  # called by uvicorn once its logging is configured
        if app is not None:
            return app
        from service.main import create_app

        built = create_app()
        freeze_startup_heap()
        return built

    config = uvicorn.Config(
        served,
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Our JSON (or text) format for uvicorn's own loggers too; one access line per request
        # comes from service.api.metrics, with the request id.
        log_config=logging_config(settings.log_level, settings.log_format),
        access_log=False,
    )
    server = uvicorn.Server(config)
    if naming_slot is None:
        server.run()
        return
    NAMING.use_slot(naming_slot)
    server.run(sockets=[shared_port_socket(settings.host, settings.port)])


def refuse_a_taken_port(host: str, port: int) -> None:
    """Exit as uvicorn does when the port is taken. SO_REUSEPORT alone would let the API processes
    join the listeners of another server started the same way (a second bnlab on another database,
    say), each then answering some of the other's connections; a plain bind fails on any listener."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            sys.exit(f"cannot listen on {host}:{port}: {exc.strerror}")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def freeze_startup_heap() -> None:
    """What start-up imported and built (torch, Optuna, the routes: over 400,000 objects) lives as
    long as the process. Frozen, the collector's full passes skip it: each took 50-150 ms, a stall of
    every request in flight (the p99 under load). Frozen before a fork, the children share its pages
    instead of each writing its own copy of them (~120 MB) as its collector marks the objects."""
    gc.collect()
    gc.freeze()


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket on a port that other API processes listen on too: with SO_REUSEPORT the
    kernel spreads new connections over the processes, and a process that exits takes only its own
    connections with it."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    return sock


def run_worker() -> None:
    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    command = worker_command()
    os.execv(command[0], command)


def run_all() -> None:
    """API and one worker in the foreground, each restarted if it exits on its own; Ctrl-C (or
    SIGTERM) stops both cleanly."""
    from service.main import create_app
    from service.supervisor import Supervisor, command

    migrate()
    # Built once, here: a restarted API is a fork of this process, answering within a second.
    starters = api_starters(create_app()) | {
        # Through `bnlab worker`: each start names its Celery node after its own PID, so a restarted
        # worker is a new node, one that may take back the runs its predecessor handed back.
        "worker": command([sys.executable, "-m", "service.cli", "worker"]),
    }
    sys.exit(Supervisor.of(starters, grace_s=SHUTDOWN_GRACE_S).run())


def configure_logging() -> None:
    from service.telemetry import configure_logging as configure

    settings = get_settings()
    configure(settings.log_level, settings.log_format)


COMMANDS: dict[str, tuple[Callable[[], None], str]] = {
    "api": (serve_api, "serve the HTTP API"),
    "worker": (run_worker, "start one Celery worker"),
    "migrate": (migrate, "apply database migrations"),
    "run": (run_all, "migrate, then serve the API and one worker (restarted if they exit) until Ctrl-C"),
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train and serve BatchNorm / no-BatchNorm models.

    Server roles: api, worker, run, migrate, keys. User commands talk to the API at BNLAB_URL
    (default http://127.0.0.1:8000) with the key in BNLAB_API_KEY. Exit codes: 0 done; 1 a run or
    experiment waited for did not succeed; 2 bad usage; 3 the API refused the request; 4 the API
    could not be reached; 5 (export) MLflow is missing or its store refused.
    """


def _server_command(name: str, function: Callable[[], None], help_text: str) -> click.Command:
    def callback() -> None:
        configure_logging()
        function()

    return click.Command(name, callback=callback, help=help_text, short_help=help_text)


for _name, (_function, _help) in COMMANDS.items():
    cli.add_command(_server_command(_name, _function, _help))


@cli.group()
def keys() -> None:
    """Manage API keys (BNLAB_API_KEYS_FILE)."""


@keys.command("create")
@click.option("--scopes", required=True, help="comma-separated: read, train, admin")
@click.option("--name", required=True, help="a name for the key (letters, digits, . _ -)")
def create_key(scopes: str, name: str) -> None:
    """Append a new key to BNLAB_API_KEYS_FILE and print it once."""
    from service.auth import KeyFileError
    from service.auth import create_key as append_key

    path = get_settings().api_keys_file
    if path is None:
        raise SystemExit("set BNLAB_API_KEYS_FILE to the keys file first (it is created if missing)")
    try:
        key = append_key(path, scopes=scopes, name=name)
    except KeyFileError as exc:
        raise SystemExit(f"bnlab keys create: {exc}") from exc
    print(key)  # noqa: T201 - shown once: only its hash is stored
    print(f"# key '{name}' ({scopes}) added to {path}; it is not shown again", file=sys.stderr)  # noqa: T201


register_client_commands(cli)
cli.add_command(cards)
cli.add_command(export)
cli.add_command(search)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="bnlab")


if __name__ == "__main__":
    main()
