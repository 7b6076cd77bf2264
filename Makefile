# The commands the README names. Everything runs from the project's own virtual environment.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp

.PHONY: install run test lint format migrate fuzz loadtest loadtest-short bench bench-serve bench-train bench-families bench-grid bench-scale compose-test replications clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## API + one worker on the embedded SQLite database and embedded broker; Ctrl-C stops both.
## One training process per core, one thread each (unless set): the runs of a pair train side by
## side, and a small model's step does not wait on a second thread (bench/train.py measured the
## pair ten times slower with one process of two threads on a busy 2-core machine). Each training
## process decodes Fashion-MNIST as it starts (BNLAB_PRELOAD_DATASETS; set it empty to skip). One API
## process per core too: under inference load one process is bound to one core by Python's GIL.
run: install
	BNLAB_WORKER_CONCURRENCY=$${BNLAB_WORKER_CONCURRENCY:-0} BNLAB_API_PROCESSES=$${BNLAB_API_PROCESSES:-0} \
	BNLAB_PRELOAD_DATASETS=$${BNLAB_PRELOAD_DATASETS-fashion-mnist} $(BIN)/bnlab run

migrate: install
	$(BIN)/bnlab migrate

## Every available replication card at quick scale, one after another, against a running `make run`;
## writes docs/replications.md and its figures (docs/replications/). Run it on a quiet machine.
replications: install
	$(BIN)/bnlab cards run --all --scale quick --write docs/replications.md

## Lint, types, import contracts, then the whole test suite (needs Postgres and Redis on 127.0.0.1).
test: install lint
	$(BIN)/python -m pytest

## Schemathesis, every check, against a real API + worker (with a key and without credentials).
fuzz: install
	$(BIN)/python tests/fuzz/run_fuzz.py

## Load test (tests/load/run_load.py): hey against a real `bnlab run`, on SQLite + the embedded broker
## and on Postgres + Redis (127.0.0.1): 100 concurrent submits, predict and V2 infer at 128 clients
## for 10 s, 200 SSE clients while runs train, 50 concurrent experiments of 10 runs. Fails on any 5xx
## but a 503 with Retry-After, and on a lost or duplicated run; prints throughput and p50/p99.
## Needs hey (Debian: apt-get install hey). Five to six minutes on 2 cores.
loadtest: install
	$(BIN)/python -m tests.load.run_load

## The same checks with fewer runs and seconds, as CI runs it (two to three minutes).
loadtest-short: install
	LOAD_SHORT=1 $(BIN)/python -m tests.load.run_load

## Every benchmark; each prints a table and asserts nothing (run them on a quiet machine).
bench: bench-serve bench-train bench-families bench-grid

## Serving benchmark: bnlab beside MLServer (installed on first use into its own virtual environment
## under /var/cache/bnlab-bench, or BNLAB_BENCH_CACHE), both driven by hey on loopback at 1, 8, 64
## and 128 clients (about three minutes). Needs hey (Debian: apt-get install hey).
bench-serve: install
	$(BIN)/python bench/serve.py

## Training benchmark: the article's BN/no-BN pair as an idiomatic loop, through the API, and the
## matmul floor; then inference throughput (about a minute on a quiet 2-core machine).
bench-train: install
	$(BIN)/python bench/train.py

## Every workload family (CNN, ResNet-20, LSTM with and without recurrent BN, deep MLPs): an
## idiomatic PyTorch loop, bnlab through the API, and the forward/backward floor, side by side.
bench-families: install
	$(BIN)/python bench/families.py

## A 4 × 5 grid of small runs through the API against one run alone, the same with larger runs, and
## a 4 × 5 replication card (higher-lr): the share of the cores' time spent in training steps
## (about a minute and a half).
bench-grid: install
	$(BIN)/python bench/train.py --grid

## Scale curve: training throughput over batch sizes 32-1024 and widths 128-2048 (BN and no-BN, one
## thread), then a 20-run grid through the API vs one run alone, and its utilisation (about three minutes).
bench-scale: install
	$(BIN)/python bench/train.py --scale

lint: install
	$(BIN)/ruff check service workers migrations tests bench
	$(BIN)/ruff format --check service workers migrations tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format service workers migrations tests bench
	$(BIN)/ruff check --fix service workers migrations tests bench

## The container deployment for real (needs root, or Podman already set up): a Debian base made with
## debootstrap, the images built with Podman, docker-compose.yml run with podman-compose on loopback,
## the README's session and a worker-restart drill against it, then down. Images and the base are kept
## in build/compose-test for the next run (tests/deploy/drive_compose.py; docs/deployment.md).
compose-test:
	$(PYTHON) tests/deploy/drive_compose.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
