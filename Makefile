# curate: `make help` lists the targets. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## show this help
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	@touch $(STAMP)

venv: $(STAMP) ## create the virtual environment (one pip resolve, pinned)

demo: $(STAMP) ## build the demo dataset from real photos and curate it locally
	$(BIN)/python -m libcurate.demo --out demo-run/source
	HF_HUB_OFFLINE=1 $(BIN)/curate run recipes/demo.yaml
	$(BIN)/curate audit demo-run/run --recipe recipes/demo.yaml

demo-self-filter: $(STAMP) ## Self-Filter on the demo data: score net co-trained with a reference VLM, then diversity_greedy
	$(BIN)/python -m libcurate.demo --out demo-run/source
	HF_HUB_OFFLINE=1 $(BIN)/curate run recipes/self_filter.yaml
	$(BIN)/curate audit demo-run/self-filter --recipe recipes/self_filter.yaml

demo-instructiongpt4: $(STAMP) ## InstructionGPT-4 on the demo data: subset fine-tunes -> learned selector -> spectral pick
	$(BIN)/python -m libcurate.demo --out demo-run/source
	HF_HUB_OFFLINE=1 $(BIN)/curate run recipes/instructiongpt4.yaml
	$(BIN)/curate audit demo-run/instructiongpt4 --recipe recipes/instructiongpt4.yaml

# The data engine: both generation recipes against the project's OpenAI-compatible test server on
# loopback, each run twice (the second sends 0 requests: done shards and the response cache), then the
# audit. The server is stopped on exit, also when a step fails.
ENGINE_PORT_FILE := demo-run/engine-server.port
demo-engine: $(STAMP) ## MMInstruct + LRV recipes (generated samples judged, selected, exported) vs a local test server
	$(BIN)/python -m libcurate.demo --out demo-run/source
	$(BIN)/python -m libcurate.generate.engine_demo regions --source demo-run/source
	@set -e; rm -f $(ENGINE_PORT_FILE); \
	$(BIN)/python -m libcurate.generate.engine_demo serve --port-file $(ENGINE_PORT_FILE) & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server 2>/dev/null; rm -f $(ENGINE_PORT_FILE)' EXIT; \
	for i in $$(seq 100); do test -s $(ENGINE_PORT_FILE) && break; sleep 0.1; done; \
	export OPENAI_BASE_URL=http://127.0.0.1:$$(cat $(ENGINE_PORT_FILE))/v1 OPENAI_API_KEY=local-test-key; \
	for recipe in mminstruct lrv; do \
	  for run in 1 2; do \
	    before=$$($(BIN)/python -m libcurate.generate.engine_demo count); \
	    HF_HUB_OFFLINE=1 $(BIN)/curate run recipes/$$recipe.yaml; \
	    after=$$($(BIN)/python -m libcurate.generate.engine_demo count); \
	    echo "== $$recipe run $$run: $$((after - before)) requests to $$OPENAI_BASE_URL"; \
	  done; \
	  $(BIN)/curate audit demo-run/$$recipe --recipe recipes/$$recipe.yaml; \
	done

test: $(STAMP) ## run the test suite (what CI runs)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP) ## the suite without slow and container tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not container" $(PYTEST_ARGS)

test-faults: $(STAMP) ## the long fault runs: S3 faults, SIGKILL trials, LLM chaos (figures: bench/FAULTS.md)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider -m faults tests/test_faults_storage.py tests/test_faults_kill.py tests/test_faults_llm.py $(PYTEST_ARGS)

bench: $(STAMP) ## run the benchmarks (results go in bench/RESULTS.md by hand, with their command)
	$(BIN)/python bench/ingest.py --json
	$(BIN)/python bench/score_clip.py --json
	$(BIN)/python bench/llm_judge.py --json
	$(BIN)/python bench/select.py --json

render: $(STAMP) ## render the demo recipe's Argo YAML into build/argo
	$(BIN)/curate render recipes/demo.yaml --out build/argo --prefix s3://curate-demo/run

images: ## build the CPU stage image (docker if a daemon answers, else buildah; base via debootstrap)
	bash images/build.sh cpu

images-gpu: ## build the GPU stage image (GPU_BASE_IMAGE build arg)
	bash images/build.sh gpu

k8s-validate: $(STAMP) ## strict validation of the k8s/ manifests against Kubernetes 1.37
	$(BIN)/kubernetes-validate --strict -k 1.37.0 k8s/*.yaml

test-container: $(STAMP) ## the container proof: build the CPU image, run a stage in it against moto S3
	$(BIN)/python -m pytest -q -m container $(PYTEST_ARGS)

snapshots: $(STAMP) ## regenerate the rendered-workflow snapshots after an intended change
	CURATE_UPDATE_SNAPSHOTS=1 $(BIN)/python -m pytest -q tests/test_workflows.py

clean: ## remove the demo run and build outputs
	rm -rf demo-run build

.PHONY: help venv demo demo-self-filter demo-instructiongpt4 demo-engine test test-fast test-faults bench render images images-gpu k8s-validate test-container snapshots clean
