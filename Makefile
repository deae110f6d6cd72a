# The single definition of how to set up, run, test and measure EMILI.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
EMILI := $(VENV)/bin/emili
STAMP := $(VENV)/.setup-stamp
SETUP_INPUTS := scripts/setup.sh scripts/fetch_artifacts.py requirements/constraints.txt requirements/dev.txt \
	requirements/runtime.txt $(wildcard libs/*/pyproject.toml) testing/pyproject.toml $(wildcard services/*/pyproject.toml)
ARTIFACTS := var/artifacts/fer/mini_xception.onnx var/artifacts/samples/face_640x480.jpg
PYTEST_ARGS ?=
DEMO_CONFIG ?= libs/pipeline/configs/demo.yaml
LOAD_ARGS ?= --users 20 --minutes 2
IMAGES := fer chat gateway labeler trainer
TAG ?= dev

.PHONY: help images setup proto proto-check up down status test test-unit lint fmt typecheck demo loop-demo load chaos bench-fer bench-chat bench-labeler bench-trainer bench-hidden-quality clean

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): $(SETUP_INPUTS)
	bash scripts/setup.sh

$(ARTIFACTS): | $(STAMP)
	$(PY) scripts/fetch_artifacts.py

setup: $(STAMP) $(ARTIFACTS)  ## Create .venv, install everything, fetch and convert models (idempotent).

proto: $(STAMP)  ## Regenerate libs/proto from protos/ (with type stubs).
	$(PY) scripts/gen_protos.py

proto-check: $(STAMP)  ## Fail if the committed generated code is stale.
	$(PY) scripts/gen_protos.py --check

up: setup  ## Start Redis, the S3 server and the services; wait until healthy.
	$(EMILI) stack up

down:  ## Stop the local stack (data in var/ is kept).
	@if [ -x $(EMILI) ]; then $(EMILI) stack down; else echo "nothing to stop"; fi

status: setup  ## Health of every component of the local stack.
	$(EMILI) status

test: setup  ## Every test: unit and integration (fixtures start real Redis and S3 servers).
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup  ## Unit tests only.
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: setup  ## ruff (lint and format check), mypy, stale generated code, import layering, declared dependencies, k8s schemas, monitoring rules and dashboards.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy libs/core/src libs/session/src libs/affect/src libs/llm/src testing/src services/fer/src services/chat/src services/gateway/src services/labeler/src services/trainer/src libs/pipeline/src
	$(PY) scripts/gen_protos.py --check
	$(PY) deploy/monitoring/build.py --check
	promtool check rules deploy/monitoring/rules/emili.rules.yaml
	$(VENV)/bin/lint-imports --no-cache --no-logo
	bash scripts/check_deps.sh
	$(PY) deploy/k8s/validate.py

fmt: setup  ## Apply ruff's fixes and formatting.
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: up  ## The main job: simulated users, then label, SFT, DPO and evaluate on the local stack; prints the report.
	$(EMILI) pipeline run $(DEMO_CONFIG)

# The gateway reads its canary sizes when it starts: the demo restarts the stack with them (data in var/ is kept).
LOOP_DEMO_ENV := EMILI_LOOP_POLICY=$(CURDIR)/var/run/loop-demo-policy.yaml EMILI_GATEWAY__CANARY__MAX_SESSIONS=5 \
	EMILI_GATEWAY__CANARY__INTERVAL_S=10

loop-demo: setup  ## The automatic loop from base to a decision, driven by SIMULATED participants through the gateway (25-45 min; LOOP_DEMO_ARGS).
	@if [ -x $(EMILI) ]; then $(EMILI) stack down; fi
	@# No loop process until the demo has written the copy of the policy it was given: a copy left by an earlier
	@# demo (another policy or study) would act first.
	rm -f var/run/loop-demo-policy.yaml
	$(LOOP_DEMO_ENV) $(EMILI) stack up
	$(LOOP_DEMO_ENV) $(EMILI) loop demo $(LOOP_DEMO_ARGS)

load: up  ## Load test: M sessions at 1 face input/s for T minutes (LOAD_ARGS="--users M --minutes T"); prints JSON.
	$(EMILI) pipeline load $(LOAD_ARGS)

chaos: up  ## Load test while faults are injected (FER restart, chat worker SIGKILL, S3 down 60 s, Redis SIGKILL); prints the zero-loss audit.
	$(PY) scripts/chaos.py $(CHAOS_ARGS)

bench-fer: setup  ## FER accuracy and gRPC throughput/latency; prints JSON (record it in BENCHMARKS.md).
	$(PY) services/fer/bench/bench_fer.py $(BENCH_ARGS)

bench-chat: setup  ## Chat: readout overhead per turn, model speed on CPU, concurrent sessions; prints JSON.
	$(PY) services/chat/bench/bench_chat.py $(BENCH_ARGS)

bench-labeler: up  ## Labeler: ScoreTexts throughput, 1,000 sessions through the queue; prints JSON.
	$(PY) services/labeler/bench/bench_labeler.py $(BENCH_ARGS)

bench-trainer: setup  ## Trainer: LoRA SFT and DPO of SmolLM2-135M on 200 examples (CPU; --gpu for a ~1B model); JSON.
	$(PY) services/trainer/bench/bench_trainer.py $(BENCH_ARGS)

bench-hidden-quality: up  ## Study: what a pipeline's candidates learned, by the simulator's hidden reply quality (PIPELINE=pl-...); SYNTHETIC; JSON.
	$(PY) services/trainer/bench/bench_hidden_quality.py --pipeline $(PIPELINE) $(BENCH_ARGS)

images:  ## Build every service's image from the one Dockerfile (TAG=dev; IMAGES="fer trainer" VARIANT=gpu).
	for svc in $(IMAGES); do docker build --build-arg SERVICE=$$svc --build-arg VARIANT=$${VARIANT:-cpu} -t emili-$$svc:$(TAG) . || exit 1; done

clean: down  ## Remove the local stack's data and logs (keeps .venv and artefacts).
	rm -rf var/redis var/s3 var/log var/run var/prometheus
