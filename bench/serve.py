"""Serving benchmark: bnlab beside MLServer, the KServe V2 reference server, over HTTP on loopback.

A benchmark, not a test: it prints a table, asserts nothing, and its figures depend on the machine.

    .venv/bin/python bench/serve.py    # about three minutes on a 2-core machine; `make bench-serve`

What it does, all on 127.0.0.1 with a temporary data folder:
1. trains the article's model (Flatten → Dense(128, relu) → BN → Dense(10)) on Fashion-MNIST
   (synthetic data with --synthetic) for two epochs in-process and stores it as a succeeded run;
2. exports it with bnlab's own ONNX export (BN folded, as served);
3. starts `bnlab api` as `make run` starts it, one API process per core (in-flight cap, queue,
   micro-batching, logs at warning), the per-key rate limit raised out of the way; and, where that
   is more than one process, a second `bnlab api` of one process, measured on V2 infer beside it;
4. starts MLServer (SeldonIO's, from PyPI) in a virtual environment of its own, created on first use
   under the cache folder (--cache, default /var/cache/bnlab-bench) so that bnlab's dependencies stay
   its own. MLServer 1.7 has no ONNX runtime package of its own: it serves the exported ONNX file
   through a custom runtime written below (an MLModel running onnxruntime with one thread, softmax
   and argmax in numpy), with `parallel_workers` 0 and its debug logging off. If the environment
   cannot be made (no network, no PyPI) the benchmark says why and measures bnlab alone;
5. checks that both servers answer the same request with the same probabilities (within 1e-6);
6. drives both with `hey` (a compiled load generator; Debian: apt-get install hey) at 1, 8, 64 and
   128 clients, each cell `--seconds` long after a short warm-up, one Fashion-MNIST test image (784
   FP32 values) per request: V2 infer on both servers, bnlab's own /predict, and each server's
   cheapest route, its HTTP floor (bnlab `GET /health/live`, MLServer `GET /v2/health/live`);
7. prints one table: requests/s, p50, p99 and non-200 answers per cell, bnlab / MLServer ratios,
   and inference's share of its own server's floor; then the bare forward pass in-process.

Every process it starts is stopped by its own PID; nothing listens beyond loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLIENTS = (1, 8, 64, 128)
MLSERVER_VERSION = "1.7.1"
MLSERVER_MODEL = "bench"
# bnlab is measured as `make run` starts it, one API process per core; where that is more than one,
# also as a single process, the way MLServer serves.
ONE_PROCESS = "bnlab-1"
DEFAULT_CACHE = Path(os.environ.get("BNLAB_BENCH_CACHE", "/var/cache/bnlab-bench"))
STARTUP_TIMEOUT_S = 120

# MLServer's custom runtime: the exported ONNX model on onnxruntime, one thread, bnlab's two outputs.
MLSERVER_RUNTIME = """
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        uri = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._sample_shape = tuple(self._session.get_inputs()[0].shape[1:])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        logits = self._session.run(None, {"input": x.reshape(-1, *self._sample_shape)})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output("probabilities", probabilities),
                NumpyCodec.encode_output("predictions", probabilities.argmax(axis=1).astype(np.int64)),
            ],
        )
"""


def say(text: str = "") -> None:
    """The benchmark's output: its table goes to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def store_model(data_dir: Path, synthetic: bool) -> tuple[str, list[float]]:
    """Train the article's BN model briefly, store it as a succeeded run; return its id and one image."""
    os.environ["BNLAB_DATA_DIR"] = str(data_dir)
    from service.db import session_scope
    from service.migrate import upgrade_to_head
    from service.ml import checkpoints, datasets, training
    from service.models import RunStatus
    from service.runs import repository as run_repo
    from service.runs.schemas import RunCreate
    from service.runs.spec import model_config, train_config

    upgrade_to_head()
    name = "synthetic" if synthetic else "fashion-mnist"
    spec = RunCreate.model_validate({"name": "bench", "dataset": {"name": name}, "train": {"epochs": 2}})
    search = [datasets.SYSTEM_DATASET_DIR]
    full = datasets.load_dataset(name, search_dirs=search, split="train", limit=spec.dataset.limit)
    train_set, val_set = datasets.train_val_split(full, spec.dataset.val_split)
    config = model_config(spec)
    result = training.train(config, train_config(spec), train_set, val_set)
    weights = checkpoints.save_checkpoint(result.model, config)
    with session_scope() as session:
        run = run_repo.create_run(session=session, spec=spec)
        run.status = RunStatus.succeeded.value
        run_repo.save_artifact(
            session=session,
            run_id=run.id,
            weights=weights,
            model_config=config.to_dict(),
            sha256=checkpoints.sha256_hex(weights),
        )
        run_id = run.id
    test = datasets.load_dataset(name, search_dirs=search, split="test", limit=1)
    image = (test.x[0].reshape(-1).double() / 255).tolist()
    say(f"model: run {run_id}, val_accuracy {result.epochs[-1].val_accuracy:.3f} after 2 epochs on {name}")
    return run_id, image


def export_model(run_id: str, folder: Path) -> Path:
    """bnlab's ONNX export of the served (fused) model, as GET .../model.onnx answers it."""
    from service.serving.export import export_onnx
    from service.serving.server import open_model

    _, loaded = open_model(run_id, None)
    path = folder / "model.onnx"
    path.write_bytes(export_onnx(loaded.module(True), tuple(loaded.config.input_shape)))
    return path


# ---------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        """SIGTERM to the one process this benchmark started (by its PID), SIGKILL after 20 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def wait_until_live(server: Server, path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{tail(server.log)}")
        try:
            with urllib.request.urlopen(server.url(path), timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{server.name} did not start in {STARTUP_TIMEOUT_S} s:\n{tail(server.log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def start_bnlab(name: str, processes: int, data_dir: Path, logs: Path) -> Server:
    """`bnlab api` with `processes` API processes (0: one per core, as `make run` starts)."""
    # BNLAB_SERVE_* set by the caller (say BNLAB_SERVE_MICRO_BATCHING=false) reach the server; other
    # BNLAB_ variables do not, so a developer's own settings cannot point it at their database.
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_") or k.startswith("BNLAB_SERVE_")}
    env |= {
        "BNLAB_DATA_DIR": str(data_dir),
        "BNLAB_HOST": "127.0.0.1",
        "BNLAB_PORT": str(port),
        "BNLAB_API_PROCESSES": str(processes),
        "BNLAB_LOG_LEVEL": "warning",
        "BNLAB_RATE_LIMIT_PER_MINUTE": "1000000",
        "BNLAB_RATE_LIMIT_BURST": "100000",
    }
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(name, process, port, log)
    wait_until_live(server, "/health/live")
    return server


def mlserver_environment(cache: Path) -> Path | str:
    """The MLServer virtual environment's python, made on first use; or why it could not be made."""
    venv = cache / f"mlserver-{MLSERVER_VERSION}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python
    say(f"creating MLServer {MLSERVER_VERSION}'s environment in {venv} (once; a minute or two)")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", f"mlserver=={MLSERVER_VERSION}", "onnxruntime"],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
        return f"could not install MLServer {MLSERVER_VERSION} into {venv}: {reason[0]}"
    stamp.touch()
    return python


def start_mlserver(python: Path, onnx: Path, folder: Path, logs: Path) -> Server:
    models = folder / "mlserver"
    (models / MLSERVER_MODEL).mkdir(parents=True)
    shutil.copy(onnx, models / MLSERVER_MODEL / "model.onnx")
    (models / "onnx_runtime.py").write_text(MLSERVER_RUNTIME)
    port = free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
        "debug": False,
    }
    (models / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": MLSERVER_MODEL,
        "implementation": "onnx_runtime.OnnxClassifier",
        "parameters": {"uri": "./model.onnx"},
    }
    (models / MLSERVER_MODEL / "model-settings.json").write_text(json.dumps(model_settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BNLAB_", "MLSERVER_"))}
    env |= {"PYTHONPATH": str(models), "OMP_NUM_THREADS": "1"}
    log = logs / "mlserver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(python.parent / "mlserver"), "start", str(models)],
            cwd=models,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server("MLServer", process, port, log)
    wait_until_live(server, f"/v2/models/{MLSERVER_MODEL}/ready")
    return server


# ---------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Target:
    """One route of one server, and the body hey sends to it (None: GET)."""

    server: Server
    route: str
    path: str
    body: bytes | None = None


def v2_body(image: list[float]) -> bytes:
    tensor = {"name": "input", "shape": [1, len(image)], "datatype": "FP32", "data": image}
    return json.dumps({"inputs": [tensor]}).encode()


def post(url: str, body: bytes) -> dict[str, object]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        result: dict[str, object] = json.loads(answer.read())
        return result


def probabilities_of(answer: dict[str, object]) -> list[float]:
    outputs = answer["outputs"]
    assert isinstance(outputs, list)
    for output in outputs:
        if output["name"] == "probabilities":
            return [float(v) for v in output["data"]]
    raise ValueError("no probabilities in the answer")


def compare_outputs(bnlab: Target, mlserver: Target) -> float:
    """The largest difference between the two servers' probabilities for the same image."""
    assert bnlab.body is not None
    assert mlserver.body is not None
    ours = probabilities_of(post(bnlab.server.url(bnlab.path), bnlab.body))
    theirs = probabilities_of(post(mlserver.server.url(mlserver.path), mlserver.body))
    return max(abs(a - b) for a, b in zip(ours, theirs, strict=True))


# ---------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Cell:
    rate: float  # requests/s
    p50_ms: float
    p99_ms: float
    non_200: int


def hey(target: Target, clients: int, seconds: float, folder: Path) -> Cell:
    command = ["hey", "-z", f"{seconds}s", "-c", str(clients), "-t", "30"]
    if target.body is not None:
        body_file = folder / f"body-{abs(hash(target.body))}.json"
        body_file.write_bytes(target.body)
        command += ["-m", "POST", "-T", "application/json", "-D", str(body_file)]
    command.append(target.server.url(target.path))
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120).stdout
    return parse_hey(output)


def parse_hey(output: str) -> Cell:
    def number(pattern: str) -> float:
        found = re.search(pattern, output)
        return float(found.group(1)) if found else float("nan")

    statuses = {int(code): int(count) for code, count in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)}
    # Transport errors and timeouts: "Error distribution:" then one "  [count]\t<error>" line each.
    error_lines = re.search(r"Error distribution:\n((?:\s+\[\d+\].*\n?)+)", output)
    errors = (
        sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]", error_lines.group(1), re.M)) if error_lines else 0
    )
    return Cell(
        rate=number(r"Requests/sec:\s+([\d.]+)"),
        p50_ms=number(r"50%+ in ([\d.]+) secs") * 1e3,
        p99_ms=number(r"99%+ in ([\d.]+) secs") * 1e3,
        non_200=sum(count for code, count in statuses.items() if code != 200) + errors,
    )


# ---------------------------------------------------------------------------------------- table

ROWS = (  # (label, bnlab server, its route, MLServer route)
    ("V2 infer", "bnlab", "v2", "v2"),
    ("bnlab /predict vs MLServer infer", "bnlab", "predict", "v2"),
    ("HTTP floor (health/live)", "bnlab", "floor", "floor"),
    ("V2 infer, one bnlab API process", ONE_PROCESS, "v2", "v2"),
)


def print_table(results: dict[tuple[str, str, int], Cell], with_mlserver: bool) -> None:
    say()
    header = (
        f"{'clients':>7}  {'route':34} {'bnlab req/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'non-200':>7}"
        f"  {'MLServer req/s':>14} {'p50 ms':>7} {'p99 ms':>7} {'non-200':>7}  {'req/s ratio':>11}"
        f" {'p99 ratio':>9}"
    )
    say(header)
    say("-" * len(header))
    for clients in CLIENTS:
        for label, server, ours, theirs in ROWS:
            if (server, ours, clients) not in results:
                continue
            a = results[(server, ours, clients)]
            line = (
                f"{clients:>7}  {label:34} {a.rate:>11,.0f} {a.p50_ms:>7.2f} {a.p99_ms:>7.2f} {a.non_200:>7}"
            )
            b = results.get(("MLServer", theirs, clients)) if with_mlserver else None
            if b is not None:
                line += (
                    f"  {b.rate:>14,.0f} {b.p50_ms:>7.2f} {b.p99_ms:>7.2f} {b.non_200:>7}"
                    f"  {a.rate / b.rate:>10.2f}x {a.p99_ms / b.p99_ms:>8.2f}x"
                )
            say(line)
    say("(ratios: bnlab / MLServer; req/s above 1 and p99 below 1 favour bnlab)")
    say()
    say("inference's share of its server's HTTP floor (req/s of the route / req/s of health/live):")
    for clients in CLIENTS:
        floor = results[("bnlab", "floor", clients)].rate
        parts = [
            f"bnlab V2 {results[('bnlab', 'v2', clients)].rate / floor:.0%}",
            f"bnlab /predict {results[('bnlab', 'predict', clients)].rate / floor:.0%}",
        ]
        if with_mlserver and ("MLServer", "floor", clients) in results:
            share = results[("MLServer", "v2", clients)].rate / results[("MLServer", "floor", clients)].rate
            parts.append(f"MLServer V2 {share:.0%}")
        say(f"  {clients:>3} clients: " + ", ".join(parts))


def forward_times(run_id: str) -> dict[tuple[bool, int], float]:
    """Microseconds per forward pass in-process, fused vs unfused, batch 1 and 64."""
    from service.serving.server import forward_proba, open_model

    _, loaded = open_model(run_id, None)
    times = {}
    for fused in (True, False):
        module = loaded.module(fused)
        for batch in (1, 64):
            x = torch.rand(batch, *loaded.config.input_shape)
            for _ in range(200):
                forward_proba(module, x)
            runs = []
            for _ in range(7):
                started = time.perf_counter()
                for _ in range(500):
                    forward_proba(module, x)
                runs.append((time.perf_counter() - started) / 500)
            times[(fused, batch)] = sorted(runs)[3] * 1e6
    return times


# ---------------------------------------------------------------------------------------- main


def measure(
    targets: list[Target], args: argparse.Namespace, folder: Path
) -> dict[tuple[str, str, int], Cell]:
    """Every target at every client count; servers alternate within each client count, so that a
    burst of load from elsewhere on the machine hits both alike."""
    for target in targets:  # warm-up: connections, first-request paths, the model's cache
        hey(target, 8, min(1.0, args.seconds), folder)
    results = {}
    for clients in CLIENTS:
        for target in targets:
            cell = hey(target, clients, args.seconds, folder)
            results[(target.server.name, target.route, clients)] = cell
            say(
                f"  {target.server.name:8} {target.route:8} {clients:>3} clients: {cell.rate:>8,.0f} req/s, "
                f"p50 {cell.p50_ms:.2f} ms, p99 {cell.p99_ms:.2f} ms, non-200 {cell.non_200}"
                f" (load {load_average()})"
            )
    return results


def run(args: argparse.Namespace, folder: Path) -> None:
    data_dir, logs = folder / "data", folder / "logs"
    logs.mkdir(parents=True)
    data_dir.mkdir()
    run_id, image = store_model(data_dir, args.synthetic)
    say(f"machine: {os.cpu_count()} cores; torch {torch.__version__}; load {load_average()}")
    onnx = export_model(run_id, folder)
    environment = mlserver_environment(args.cache) if not args.bnlab_only else "--bnlab-only"
    servers: list[Server] = []
    try:
        bnlab = start_bnlab("bnlab", 0, data_dir, logs)
        servers.append(bnlab)
        processes = os.cpu_count() or 1  # what BNLAB_API_PROCESSES=0 reads as
        say(f"bnlab: {processes} API process(es), one per core, as make run starts them")
        targets = [
            Target(bnlab, "v2", f"/v2/models/{run_id}/infer", v2_body(image)),
            Target(
                bnlab, "predict", f"/api/v1/runs/{run_id}/predict", json.dumps({"inputs": [image]}).encode()
            ),
            Target(bnlab, "floor", "/health/live"),
        ]
        if isinstance(environment, Path):
            mlserver = start_mlserver(environment, onnx, folder, logs)
            servers.append(mlserver)
            theirs = Target(mlserver, "v2", f"/v2/models/{MLSERVER_MODEL}/infer", v2_body(image))
            difference = compare_outputs(targets[0], theirs)
            verdict = "equal within 1e-6" if difference <= 1e-6 else "NOT equal within 1e-6"
            say(f"outputs: bnlab and MLServer {verdict} (largest difference {difference:.1e})")
            targets += [theirs, Target(mlserver, "floor", "/v2/health/live")]
        else:
            say(f"MLServer: not measured ({environment})")
        if processes > 1:
            single = start_bnlab(ONE_PROCESS, 1, data_dir, logs)
            servers.append(single)
            targets.append(Target(single, "v2", f"/v2/models/{run_id}/infer", v2_body(image)))
        results = measure(targets, args, folder)
    finally:
        for server in servers:
            server.stop()
    print_table(results, with_mlserver=isinstance(environment, Path))
    forwards = forward_times(run_id)
    say()
    say("forward pass in-process (bnlab's model, PyTorch), µs:   fused   unfused")
    for batch in (1, 64):
        fused, unfused = forwards[(True, batch)], forwards[(False, batch)]
        say(f"  batch {batch:>2}{'':42}{fused:>7.1f} {unfused:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="train on generated data, not Fashion-MNIST")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each cell (hey -z)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="where MLServer's environment lives"
    )
    parser.add_argument("--bnlab-only", action="store_true", help="do not start MLServer")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("bench/serve.py needs hey on PATH (Debian: apt-get install hey)")
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-serve-") as folder:
        run(args, Path(folder))


if __name__ == "__main__":
    main()
