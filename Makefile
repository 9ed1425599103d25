# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
TRITON_VENV ?= .venv-triton

.PHONY: setup test demo lint format protos bench clean triton-env system-packages

setup: $(STAMP)

# Re-installs only when the project's dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a range alone would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[all]'
	@touch $(STAMP)

# The real Triton server's own environment (its Python backend needs numpy<2): docs/triton.md.
triton-env: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed: pyproject.toml deploy/triton/setup-env.sh
	FORCE=1 PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) deploy/triton/setup-env.sh $(TRITON_VENV)

# redis-server, chromium and docker-compose from Debian, when missing (the tests drive them).
system-packages:
	.ci/system-packages

test: system-packages setup triton-env
	$(BIN)/python -m pytest tests

# The main job: synthetic data -> teacher service (+ Redis) -> prewarm -> 2-rank student -> mAP table.
demo: setup
	$(BIN)/python -m student demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: setup
	$(BIN)/python -m teacher_server.protogen

bench: setup
	$(BIN)/python bench/teacher_engine.py --size tiny

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache build *.egg-info
