#!/usr/bin/env python3
"""`make compose-test`: build bnlab's images and run docker-compose.yml for real, with Podman.

1. Tools: podman, runc, debootstrap and curl from Debian when missing (as root); podman-compose from
   PyPI in a virtual environment of its own. Podman is configured for this test alone, through
   CONTAINERS_CONF and CONTAINERS_STORAGE_CONF: runc, cgroupfs, no default ulimits, and a storage of
   its own in the cache folder, so that nothing here can touch another user's containers or images.
2. A Debian base image made with debootstrap (its tarball is kept in the cache folder), then the images
   the compose file names: bnlab:latest from the Dockerfile (BASE_IMAGE set to that base; pip set up
   as on this host, its configuration and local folders mounted read-only into the build), postgres:15
   and redis:7 from tests/deploy/Containerfile.*, all built with chroot isolation.
3. The stack, from an unchanged copy of docker-compose.yml in a folder of its own (with the keys file
   and the passwords made for this run), the API published on a free loopback port.
4. The README's session against it: the article's BN/no-BN pair on Fashion-MNIST, metrics, predict,
   the Open Inference Protocol's infer; then the drill: the worker container restarted while a run
   trains, and that run finishes exactly once (one stored model, each epoch's metrics once).
5. Down: the containers, volumes, network and files this test made. The images stay in the cache
   folder's storage for the next run (COMPOSE_TEST_KEEP=0 removes the cache folder too).

Every wait is bounded; a failure prints the containers' logs and still tears the stack down.
Environment: COMPOSE_TEST_CACHE (default build/compose-test), COMPOSE_TEST_TIMEOUT (seconds, whole
test; default 1800), COMPOSE_TEST_KEEP=0.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("COMPOSE_TEST_CACHE", ROOT / "build" / "compose-test")).resolve()
DEADLINE = time.monotonic() + float(os.environ.get("COMPOSE_TEST_TIMEOUT", "1800"))
PROJECT = "bnlabct"
BASE_IMAGE = "localhost/bnlab-debian-base:bookworm"
SUITE = "bookworm"
BASE_MAX_AGE_S = 30 * 86400
# What docker-compose.yml names, as Podman spells them once resolved (short names resolve to these).
IMAGES = {
    "bnlab": "localhost/bnlab:latest",
    "postgres": "docker.io/library/postgres:15",
    "redis": "docker.io/library/redis:7",
}
PODMAN_COMPOSE = "podman-compose==1.6.0"
FASHION = Path("/usr/share/datasets/fashion-mnist")
# Debian's tools when missing (the test runs on a fresh CI machine as root).
DEBIAN_TOOLS = {
    "podman": "podman",
    "runc": "runc",
    "debootstrap": "debootstrap",
    "curl": "curl",
    "netavark": "netavark",
    "aardvark-dns": "aardvark-dns",
    "slirp4netns": "slirp4netns",
}

T0 = time.monotonic()


def say(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    say(f"[compose-test {time.monotonic() - T0:7.1f}s] {message}")


class Failure(Exception):
    pass


def remaining(cap: float | None = None) -> float:
    left = DEADLINE - time.monotonic()
    if left <= 0:
        raise Failure("the test ran out of time (COMPOSE_TEST_TIMEOUT)")
    return min(left, cap) if cap is not None else left


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    capture: bool = False,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    input_bytes: bytes | None = None,
    quiet: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    if not quiet:
        log("$ " + shlex.join(args))
    try:
        result = subprocess.run(
            list(args),
            check=False,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            input=input_bytes,
            timeout=remaining(timeout),
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise Failure(f"timed out: {shlex.join(args)}") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or b"").decode(errors="replace")[-3000:] if capture else ""
        raise Failure(f"exit {result.returncode}: {shlex.join(args)}\n{detail}")
    return result


def output(args: Sequence[str], **kwargs: Any) -> str:
    return run(args, capture=True, quiet=kwargs.pop("quiet", True), **kwargs).stdout.decode()


# ------------------------------------------------------------------------------------------ tools


def ensure_tools() -> None:
    missing = sorted({pkg for tool, pkg in DEBIAN_TOOLS.items() if not tool_present(tool)})
    if missing:
        if os.geteuid() != 0:
            raise Failure(f"missing {', '.join(missing)}: install them (apt-get install) or run as root")
        log(f"installing Debian's {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env, timeout=600)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, timeout=900)
    venv = CACHE / "venv"
    if not (venv / "bin" / "podman-compose").exists():
        log("installing podman-compose (PyPI) into its own virtual environment")
        shutil.rmtree(venv, ignore_errors=True)
        run([sys.executable, "-m", "venv", str(venv)], timeout=300)
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", PODMAN_COMPOSE], timeout=600)


def tool_present(tool: str) -> bool:
    if shutil.which(tool):
        return True
    # netavark and aardvark-dns live in /usr/lib/podman, not on the PATH.
    return any(Path(folder, tool).exists() for folder in ("/usr/lib/podman", "/usr/libexec/podman"))


def podman_env() -> dict[str, str]:
    """Podman set up for this test only: its own configuration, storage and network folder."""
    conf = CACHE / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(str(CACHE).encode()).hexdigest()[:8]
    runroot = Path(f"/run/bnlab-compose-test-{tag}")
    if not (CACHE / "storage").exists() and runroot.exists():
        shutil.rmtree(runroot)  # the state of a storage deleted since: it would confuse Podman
    (conf / "containers.conf").write_text(
        "# Written by tests/deploy/drive_compose.py. Debian's crun fails on this host's hybrid cgroups\n"
        "# and on raising RLIMIT_NOFILE: runc, cgroupfs and no default ulimits instead.\n"
        "[containers]\n"
        "default_ulimits = []\n"
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        "[network]\n"
        f'network_config_dir = "{CACHE / "networks"}"\n'
    )
    (conf / "storage.conf").write_text(
        "# Written by tests/deploy/drive_compose.py: images and containers of this test only.\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{CACHE / "storage"}"\n'
        f'runroot = "{runroot}"\n'
    )
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(conf / "containers.conf")
    env["CONTAINERS_STORAGE_CONF"] = str(conf / "storage.conf")
    return env


ENV: dict[str, str] = {}


def podman(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return run(["podman", *args], env=ENV, **kwargs)


def podman_out(*args: str, **kwargs: Any) -> str:
    return output(["podman", *args], env=ENV, **kwargs)


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False, quiet=True).returncode == 0


# ------------------------------------------------------------------------------------------ images


def debian_mirror() -> tuple[str | None, str | None]:
    """The host's Debian mirror and its deb822 sources file, so the base uses what the host uses."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        match = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.MULTILINE)
        if match:
            return match.group(1), sources.read_text()
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1], None
    return None, None  # debootstrap's own default


def make_base() -> None:
    tarball = CACHE / f"debian-{SUITE}-base.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime > BASE_MAX_AGE_S:
        log("the cached Debian base is over 30 days old: making it anew (Debian's updates)")
        tarball.unlink()
        podman("rmi", "-f", BASE_IMAGE, check=False)
    if image_exists(BASE_IMAGE):
        log(f"base image {BASE_IMAGE}: cached")
        return
    if not tarball.exists():
        mirror, sources = debian_mirror()
        rootfs = CACHE / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        started = time.monotonic()
        run(
            [
                "debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                SUITE, str(rootfs), *([mirror] if mirror else []),
            ],
            timeout=900,
        )  # fmt: skip
        if sources is not None:  # the host's suites (updates, security) with the host's mirrors
            (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
            (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(sources)
        for folder in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                       "usr/share/locale", "usr/share/info"):  # fmt: skip
            for entry in (rootfs / folder).glob("*"):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.name != "lock":
                    entry.unlink()
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], timeout=600)
        partial.rename(tarball)
        shutil.rmtree(rootfs)
        log(f"debootstrap base made in {time.monotonic() - started:.0f}s")
    podman("import", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE_IMAGE, timeout=600)


def pip_mounts() -> list[str]:
    """pip's configuration on this host as one pip.conf, and the local files and folders it names,
    as read-only mounts for the build (`pip config list`: certificate bundle, find-links with the
    pinned torch wheel, constraints, file:// indexes). Nothing of it stays in the image."""
    listing = output([sys.executable, "-m", "pip", "config", "list"], check=False)
    values: dict[str, str] = {}
    for line in listing.splitlines():
        match = re.match(r"^:?(\w+):?\.([\w-]+)='(.*)'$", line.strip())
        if not match:
            continue
        scope, key, value = match.groups()
        if scope == "env" or key not in values:  # the environment overrides pip's files
            values[key] = value
    lines = ["[global]"] + [f"{key} = {value}" for key, value in sorted(values.items())]
    conf = CACHE / "conf" / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    mounts = [f"{conf}:/etc/pip.conf:ro"]
    for key, value in values.items():
        if key not in {"cert", "client-cert", "find-links", "constraint", "requirement", "index-url",
                       "extra-index-url"}:  # fmt: skip
            continue
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if not (path.is_absolute() and path.exists()):
                continue  # a URL: the build reaches it as the host does
            if key.endswith("index-url") and path.name == "simple":
                path = path.parent  # a PEP 503 index's links may point beside simple/
            mount = f"{path}:{path}:ro"
            if mount not in mounts:
                mounts.append(mount)
    return mounts


def build(
    tag: str, containerfile: Path, context: Path, build_args: dict[str, str], mounts: list[str]
) -> float:
    started = time.monotonic()
    args = ["build", "--isolation=chroot", "--format=docker", "-f", str(containerfile), "-t", tag]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    for mount in mounts:
        args += ["-v", mount]
    podman(*args, str(context), timeout=1500)
    return time.monotonic() - started


def build_images() -> None:
    mounts = pip_mounts()
    seconds = build(
        IMAGES["bnlab"], ROOT / "Dockerfile", ROOT,
        # pip's configuration here finds the pinned CPU torch wheel; no extra index for it.
        {"BASE_IMAGE": BASE_IMAGE, "TORCH_INDEX_URL": ""}, mounts,
    )  # fmt: skip
    log(f"bnlab image built in {seconds:.0f}s")
    for name in ("postgres", "redis"):
        seconds = build(IMAGES[name], HERE / f"Containerfile.{name}", HERE, {"BASE_IMAGE": BASE_IMAGE}, [])
        log(f"{name} image built in {seconds:.0f}s")
    # The layers a change replaced (this storage holds this test's images only).
    podman("image", "prune", "-f", check=False, capture=True, timeout=300)
    report_image_size()


def report_image_size() -> None:
    size = int(podman_out("image", "inspect", IMAGES["bnlab"], "--format", "{{.Size}}").strip())
    base = int(podman_out("image", "inspect", BASE_IMAGE, "--format", "{{.Size}}").strip())
    log(f"bnlab image: {size / 1e6:.0f} MB ({base / 1e6:.0f} MB of it the Debian base); its layers:")
    history = podman_out("history", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGES["bnlab"])
    say(history.replace("/bin/sh -c ", "")[:4000])
    script = (
        "cd /opt/bnlab/lib/python3*/site-packages && du -s --block-size=1M * | sort -rn | head -8 | "
        "tr '\\n' ' '; echo; du -s --block-size=1M /opt/bnlab /usr/share/datasets | tr '\\n' ' '"
    )
    sizes = podman_out("run", "--rm", "--entrypoint", "sh", IMAGES["bnlab"], "-c", script, check=False)
    log(f"largest installed packages (MB): {sizes.strip()}")


# ------------------------------------------------------------------------------------------ stack


class Stack:
    def __init__(self) -> None:
        self.folder = CACHE / "stack"
        self.port = free_loopback_port()
        self.env = dict(
            ENV,
            POSTGRES_PASSWORD=secrets.token_hex(16),
            REDIS_PASSWORD=secrets.token_hex(16),
            BNLAB_API_PORT=str(self.port),
        )
        self.compose = [str(CACHE / "venv" / "bin" / "podman-compose"), "-p", PROJECT, "-f",
                        str(self.folder / "docker-compose.yml")]  # fmt: skip
        self.key = ""
        self.base = f"http://127.0.0.1:{self.port}"
        self.started = False

    def prepare(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        # An unchanged copy: the keys file and the passwords of this run stay out of the work tree.
        shutil.copyfile(ROOT / "docker-compose.yml", self.folder / "docker-compose.yml")
        keys = self.folder / "bnlab-keys.txt"
        self.key = podman_out(
            "run", "--rm", "--user", "0", "--network", "none",
            "-e", "BNLAB_API_KEYS_FILE=/keys/bnlab-keys.txt", "-v", f"{self.folder}:/keys",
            IMAGES["bnlab"], "keys", "create", "--scopes", "read,train", "--name", "compose-test",
        ).strip().splitlines()[-1]  # fmt: skip
        os.chown(keys, 10001, 10001)  # the image's user reads it; mode 600 stays

    def compose_run(self, *args: str, timeout: float = 300, check: bool = True) -> None:
        run([*self.compose, *args], env=self.env, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        return f"{PROJECT}_{service}_1"

    def up(self) -> float:
        started = time.monotonic()
        self.started = True
        # In the order depends_on gives, one step at a time: Podman before 4.6 has no `wait
        # --condition=healthy` (podman-compose then skips service_healthy), and Podman 4.3 cannot start
        # a container whose --requires chain is longer than one (api -> migrate -> postgres). So each
        # step with --no-deps, the healthchecks run here until they pass; the file is unchanged.
        self.compose_run("up", "-d", "--no-build", "--no-deps", "postgres", "redis")
        self.wait_healthy(["postgres", "redis"], 90)
        self.compose_run("up", "-d", "--no-build", "--no-deps", "migrate")
        code = podman_out("wait", self.container("migrate"), timeout=180).strip()
        if code != "0":
            raise Failure(f"migrate exited with {code}")
        self.compose_run("up", "-d", "--no-build", "--no-deps", "api", "worker")
        self.wait_healthy(["api", "worker"], 180)
        return time.monotonic() - started

    def wait_healthy(self, services: list[str], limit: float) -> None:
        """Runs each healthcheck (no systemd here to schedule them) until it passes."""
        until = time.monotonic() + limit
        pending = list(services)
        while pending:
            for service in list(pending):
                result = podman("healthcheck", "run", self.container(service), check=False, capture=True,
                                quiet=True, timeout=60)  # fmt: skip
                if result.returncode == 0:
                    log(f"{service}: healthy")
                    pending.remove(service)
            if pending and time.monotonic() > until:
                raise Failure(f"not healthy within {limit:.0f}s: {', '.join(pending)}")
            if pending:
                time.sleep(2)

    def logs(self) -> None:
        say(podman_out("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}", check=False))
        for service in ("postgres", "redis", "migrate", "api", "worker"):
            say(f"----- logs of {service} (last 150 lines)")
            result = podman(
                "logs",
                "--tail",
                "150",
                self.container(service),
                check=False,
                capture=True,
                quiet=True,
                timeout=60,
            )
            say((result.stdout + result.stderr).decode(errors="replace"))

    def down(self) -> None:
        if not self.started:
            return
        global DEADLINE
        DEADLINE = max(DEADLINE, time.monotonic() + 180)  # a late failure still tears down
        self.compose_run("down", "-v", "-t", "30", timeout=170, check=False)
        # What podman-compose may leave: anything labelled with this project.
        label = f"label=io.podman.compose.project={PROJECT}"
        for kind, listing in (("container", ["ps", "-a", "-q"]), ("volume", ["volume", "ls", "-q"]),
                              ("network", ["network", "ls", "-q"])):  # fmt: skip
            left = podman_out(*listing, "--filter", label, check=False).split()
            if left:
                log(f"removing leftover {kind}s: {' '.join(left)}")
                podman(kind, "rm", "-f", *left, check=False, timeout=120)
        shutil.rmtree(self.folder, ignore_errors=True)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------ session


class Api:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def call(self, method: str, path: str, body: Any = None, *, key: bool = True) -> tuple[int, Any]:
        args = ["curl", "-s", "-m", "60", "-o", "-", "-w", "\n%{http_code}", "-X", method,
                self.stack.base + path]  # fmt: skip
        if key:
            args += ["-H", f"Authorization: Bearer {self.stack.key}"]
        data = None
        if body is not None:
            args += ["-H", "content-type: application/json", "--data-binary", "@-"]
            data = json.dumps(body).encode()
        result = run(args, capture=True, input_bytes=data, quiet=True, timeout=90, check=False)
        if result.returncode != 0:
            raise Failure(f"curl {method} {path}: exit {result.returncode}")
        text, _, code = result.stdout.decode().rpartition("\n")
        try:
            payload: Any = json.loads(text) if text else None
        except json.JSONDecodeError:
            payload = text
        return int(code), payload

    def expect(
        self, method: str, path: str, status: int, body: Any = None, *, quiet: bool = False, **kwargs: Any
    ) -> Any:
        code, payload = self.call(method, path, body, **kwargs)
        if not quiet or code != status:
            log(f"{method} {path} -> {code} {json.dumps(payload)[:200]}")
        if code != status:
            raise Failure(f"{method} {path}: expected {status}, got {code}: {json.dumps(payload)[:2000]}")
        return payload

    def wait_for(self, run_ids: list[str], limit: float) -> dict[str, Any]:
        until = time.monotonic() + limit
        seen: dict[str, str] = {}
        while True:
            runs = {rid: self.expect("GET", f"/api/v1/runs/{rid}", 200, quiet=True) for rid in run_ids}
            for run_id, current in runs.items():
                state = f"{current['status']} ({current['summary']['epochs_done']} epochs)"
                if seen.get(run_id, "").split(" ")[0] != current["status"]:
                    log(f"run {run_id} ({current['name']}): {state}")
                seen[run_id] = state
            if all(r["status"] in ("succeeded", "failed", "cancelled") for r in runs.values()):
                bad = {k: (r["status"], r["error"]) for k, r in runs.items() if r["status"] != "succeeded"}
                if bad:
                    raise Failure(f"runs did not succeed: {bad}")
                return runs
            if time.monotonic() > until:
                raise Failure(f"runs not finished within {limit:.0f}s")
            time.sleep(2)


def fashion_images() -> tuple[list[list[float]], list[int]]:
    """The README's three Fashion-MNIST test images (labels 9, 2, 1), from the host's Debian package or
    from the image's copy of it."""
    path = FASHION / "t10k-images-idx3-ubyte.gz"
    if path.exists():
        raw = gzip.decompress(path.read_bytes())
    else:
        blob = run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "cat", IMAGES["bnlab"],
                    str(path)], env=ENV, capture=True, quiet=True).stdout  # fmt: skip
        raw = gzip.decompress(blob)
    pixels = list(raw[16 : 16 + 3 * 784])
    return [[b / 255 for b in pixels[i * 784 : (i + 1) * 784]] for i in range(3)], pixels


def readme_session(api: Api) -> str:
    """The README's curl session; returns the BN run's id."""
    # The exposed API needs a key; the health probes do not.
    api.expect("GET", "/health/ready", 200, key=False)
    api.expect("GET", "/api/v1/runs", 401, key=False)
    bn = api.expect(
        "POST", "/api/v1/runs", 202,
        {"name": "fashion-bn", "dataset": {"name": "fashion-mnist"}, "model": {"norm": {"kind": "batch"}}},
    )  # fmt: skip
    no_bn_spec = {"name": "fashion-no-bn", "model": {"norm": {"kind": "none"}}}
    no_bn = api.expect("POST", "/api/v1/runs", 202, no_bn_spec)
    if bn["status"] != "queued" or bn["spec"]["train"]["epochs"] != 10:
        raise Failure(f"unexpected echo: {bn}")
    started = time.monotonic()
    runs = api.wait_for([bn["id"], no_bn["id"]], 600)
    log(f"the pair trained in {time.monotonic() - started:.1f}s (from the POSTs' answers to both succeeded)")
    listed = api.expect("GET", "/api/v1/runs?status=succeeded", 200)
    names = {item["name"] for item in listed["items"]}
    if not {"fashion-bn", "fashion-no-bn"} <= names:
        raise Failure(f"succeeded runs listed: {names}")
    for run_id, spec_run in runs.items():
        summary = spec_run["summary"]
        log(f"{spec_run['name']}: epochs {summary['epochs_done']}, val_loss {summary['val_loss']:.3f}, "
            f"val_accuracy {summary['val_accuracy']:.3f}")  # fmt: skip
        epochs = api.expect("GET", f"/api/v1/runs/{run_id}/metrics", 200)["epochs"]
        if [e["epoch"] for e in epochs] != list(range(1, 11)):
            raise Failure(f"metrics of {run_id}: epochs {[e['epoch'] for e in epochs]}")
        if summary["val_accuracy"] < 0.8:
            raise Failure(f"{spec_run['name']} learned too little: {summary}")
    images, pixels = fashion_images()
    predicted = api.expect("POST", f"/api/v1/runs/{bn['id']}/predict", 200, {"inputs": images})
    if sum(p == t for p, t in zip(predicted["predictions"], [9, 2, 1], strict=True)) < 2:
        raise Failure(f"predictions {predicted['predictions']}, labels [9, 2, 1]")
    api.expect("POST", f"/api/v1/runs/{bn['id']}/predict", 422, {"inputs": [[0.5, 0.5, 0.5]]})
    api.expect("POST", f"/api/v1/runs/{bn['id']}/cancel", 409)
    api.expect("POST", "/api/v1/runs", 422, {"train": {"epochs": 10, "batch_size": 32, "learning_rate": 0.1}})
    # The Open Inference Protocol: the run id is the model's name.
    api.expect("GET", "/v2/health/ready", 200, key=False)
    api.expect("GET", f"/v2/models/{bn['id']}", 200)
    inferred = api.expect(
        "POST", f"/v2/models/{bn['id']}/infer", 200,
        {"inputs": [{"name": "input", "shape": [3, 784], "datatype": "UINT8", "data": pixels}]},
    )  # fmt: skip
    outputs = {o["name"]: o for o in inferred["outputs"]}
    if outputs["predictions"]["data"] != predicted["predictions"]:
        raise Failure(f"V2 infer {outputs['predictions']['data']} != predict {predicted['predictions']}")
    bad = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0.5, 0.5, 0.5]}]}
    api.expect("POST", f"/v2/models/{bn['id']}/infer", 400, bad)
    return str(bn["id"])


def psql(stack: Stack, sql: str) -> list[list[str]]:
    text = podman_out("exec", stack.container("postgres"), "psql", "-U", "bnlab", "-d", "bnlab", "-AtF", "\t",
                      "-c", sql, timeout=60)  # fmt: skip
    return [line.split("\t") for line in text.splitlines() if line]


def worker_restart_drill(stack: Stack, api: Api) -> None:
    """The worker container restarted (SIGTERM, then a new one) while a run trains: the run finishes
    exactly once."""
    epochs = 20  # long enough to be mid-run when the restart lands, on a fast machine too
    drill = api.expect(
        "POST", "/api/v1/runs", 202,
        {"name": "restart-drill", "dataset": {"name": "fashion-mnist"}, "model": {"norm": {"kind": "batch"}},
         "train": {"epochs": epochs}},
    )  # fmt: skip
    run_id = drill["id"]
    until = time.monotonic() + 300
    while True:
        current = api.expect("GET", f"/api/v1/runs/{run_id}", 200, quiet=True)
        if current["status"] == "running" and current["summary"]["epochs_done"] >= 2:
            break
        if current["status"] not in ("queued", "running") or time.monotonic() > until:
            raise Failure(f"the drill's run did not get going: {current['status']}")
        time.sleep(1)
    before = psql(stack, f"SELECT worker, attempts, epochs_done FROM runs WHERE id = '{run_id}'")[0]
    if int(before[2]) >= epochs:
        raise Failure("the drill's run finished before the restart: nothing was tested")
    old_start = podman_out("inspect", stack.container("worker"), "--format", "{{.State.StartedAt}}")
    log(f"restarting the worker while run {run_id} trains (worker {before[0]}, epoch {before[2]}/{epochs})")
    started = time.monotonic()
    stack.compose_run("restart", "worker", timeout=150)
    log(f"worker container restarted in {time.monotonic() - started:.1f}s")
    if podman_out("inspect", stack.container("worker"), "--format", "{{.State.StartedAt}}") == old_start:
        raise Failure("the worker container was not restarted")
    stack.wait_healthy(["worker"], 180)
    finished = api.wait_for([run_id], 300)[run_id]
    ((worker, attempts, epochs_done, status),) = psql(
        stack, f"SELECT worker, attempts, epochs_done, status FROM runs WHERE id = '{run_id}'"
    )
    ((metric_rows, distinct_epochs),) = psql(
        stack, f"SELECT count(*), count(DISTINCT epoch) FROM epoch_metrics WHERE run_id = '{run_id}'"
    )
    ((artifacts,),) = psql(stack, f"SELECT count(*) FROM model_artifacts WHERE run_id = '{run_id}'")
    versions = api.expect("GET", f"/api/v1/runs/{run_id}/versions", 200)["items"]
    log(
        f"drill: {status}, {epochs_done}/{epochs} epochs, attempts {attempts}, "
        f"worker {before[0]} -> {worker}, "
        f"{metric_rows} metric rows ({distinct_epochs} epochs), {artifacts} artifact(s), "
        f"{len(versions)} version(s)"
    )
    if not (
        finished["status"] == "succeeded"
        and int(epochs_done) == epochs
        and int(metric_rows) == int(distinct_epochs) == epochs
        and int(artifacts) == 1
        and len(versions) == 1
    ):
        raise Failure("the drill's run did not finish exactly once")
    if worker == before[0]:
        raise Failure("the run finished on the worker that was stopped: the restart did not interrupt it")


# ------------------------------------------------------------------------------------------ main


@contextmanager
def machine_lock() -> Iterator[None]:
    """One compose-test at a time on a machine: bridges and firewall rules are machine-wide."""
    path = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
    with open(path / "bnlab-compose-test.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another compose-test holds the machine; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main() -> int:
    global ENV
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    CACHE.mkdir(parents=True, exist_ok=True)
    with machine_lock():
        stack: Stack | None = None
        try:
            ensure_tools()
            ENV = podman_env()
            log(f"podman {podman_out('--version').split()[-1]}, storage and configuration in {CACHE}")
            # A stack left by an interrupted run of this test (same project, same storage) goes first.
            stale = podman_out("ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={PROJECT}")
            if stale.split():
                log("removing containers left by an interrupted run")
                podman("rm", "-f", "-t", "5", *stale.split(), check=False, timeout=120)
            make_base()
            build_images()
            stack = Stack()
            stack.prepare()
            start_seconds = stack.up()
            log(f"stack up and healthy in {start_seconds:.1f}s (first `up` to api and worker healthy)")
            api = Api(stack)
            readme_session(api)
            worker_restart_drill(stack, api)
            log(f"PASSED in {time.monotonic() - T0:.0f}s")
            return 0
        except (Failure, KeyboardInterrupt) as exc:
            log(f"FAILED: {exc}")
            if stack is not None and stack.started:
                stack.logs()
            return 1
        finally:
            if stack is not None:
                stack.down()
            if os.environ.get("COMPOSE_TEST_KEEP", "1") == "0":
                shutil.rmtree(CACHE, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
