"""`make fuzz`: schemathesis, every check, against a real `bnlab run` (API + worker) on loopback.

Two passes over the OpenAPI document: with an admin key, and without credentials. Exits non-zero
on any failure. The server runs on a temporary SQLite database with its own keys file, and is
stopped by the PID this script started it with. FUZZ_EXAMPLES and FUZZ_SEED tune a run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXAMPLES = os.environ.get("FUZZ_EXAMPLES", "20")
SEED = os.environ.get("FUZZ_SEED", "20261125")
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_small_mnist(folder: Path, samples: int = 200) -> None:
    """Real IDX files (random pixels) so that every dataset the schema names exists on this server:
    a missing dataset is a deliberate 422, which a fuzzer would count as valid input rejected."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, size=(samples, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=samples, dtype=np.uint8)
    for split in ("train", "t10k"):
        header = struct.pack(">IIII", 2051, samples, 28, 28)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = struct.pack(">II", 2049, samples)
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))


def wait_ready(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"fuzz: the API at {url} did not become ready")


def warm_card_estimates(url: str, key: str) -> None:
    """The card list estimates each card's run time from forward passes of its 51 networks, once per
    API process: 2-4 s on a 2-core machine, more when it is busy, against the fuzzer's 10 s per
    request. Asked once before fuzzing (one API process, below), so that the fuzzer checks the
    route's answers rather than its first call's time."""
    request = urllib.request.Request(f"{url}/api/v1/cards", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        if response.status != 200:
            raise SystemExit(f"fuzz: GET /api/v1/cards answered {response.status}")


def schemathesis(url: str, folder: Path, headers: list[str], label: str) -> int:
    command = [
        str(BIN / "schemathesis"), "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
        "--checks", "all",
        "--max-examples", EXAMPLES, "--seed", SEED, "--workers", "1", "--no-color",
        "--report", "junit", "--report-dir", str(folder / label), *headers,
    ]  # fmt: skip
    print(
        f"fuzz: {label}: {' '.join(c if 'Bearer' not in c else 'Authorization: Bearer ***' for c in command)}"
    )
    return subprocess.run(command, cwd=folder, check=False).returncode


def junit_counts(folder: Path) -> tuple[int, int]:
    """(passed, failed) test cases over every JUnit report schemathesis wrote under `folder`."""
    import xml.etree.ElementTree as ET  # noqa: N817  # the stdlib's own idiom

    passed = failed = 0
    for report in folder.rglob("junit-*.xml"):
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
            elif case.find("skipped") is None:
                passed += 1
    return passed, failed


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bnlab-fuzz-") as tmp:
        folder = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_")}
        keys_file = folder / "keys.txt"
        port = free_port()
        env |= {
            "BNLAB_DATA_DIR": str(folder / "data"),
            "BNLAB_API_KEYS_FILE": str(keys_file),
            "BNLAB_PORT": str(port),
            "BNLAB_LOG_LEVEL": "warning",
            # The fuzzer is one client sending thousands of requests: lift the per-key limits, and
            # keep the runs it submits short.
            "BNLAB_RATE_LIMIT_PER_MINUTE": "1000000",
            "BNLAB_RATE_LIMIT_BURST": "100000",
            "BNLAB_MAX_ACTIVE_RUNS_PER_KEY": "100000",
            "BNLAB_MAX_RUN_SECONDS": "5",
            # One API process, whose card estimates warm_card_estimates computes before fuzzing.
            "BNLAB_API_PROCESSES": "1",
        }
        write_small_mnist(folder / "data" / "mnist")
        key = subprocess.run(
            [str(BIN / "bnlab"), "keys", "create", "--scopes", "admin", "--name", "fuzz"],
            env=env, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        with (folder / "server.log").open("wb") as log:
            server = subprocess.Popen(
                [str(BIN / "bnlab"), "run"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            warm_card_estimates(url, key)
            failures = schemathesis(url, folder, ["-H", f"Authorization: Bearer {key}"], "with-key")
            failures |= schemathesis(url, folder, [], "without-credentials")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        if server.returncode not in (0, -signal.SIGTERM):
            print((folder / "server.log").read_text()[-3000:])
        passed, failed = junit_counts(folder)
        # The plain closing line CI reads ("N passed, N failed"), counted from schemathesis' reports.
        print(f"fuzz: {passed} passed, {failed} failed")
        return 1 if failures or failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
