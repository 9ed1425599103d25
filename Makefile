# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# The index torch's wheel comes from (docs/training.md, "Installing PyTorch"). Empty: pip's own
# configured index. Which build that gives depends on the index, not on the pinned version:
# PyPI's Linux x86_64 wheel is the CUDA build (several GB with its nvidia-* libraries), a
# mirror or a local wheel directory may hold the CPU one. Name the build you want:
#   GPU hosts: make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#   CPU hosts: make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_SPEC := torch==$(TORCH_VERSION)$(if $(TORCH_INDEX_URL), from $(TORCH_INDEX_URL))
TRITON_VENV ?= .venv-triton

.PHONY: setup test check typecheck demo lint format protos bench gpu-check clean triton-env system-packages FORCE

setup: $(STAMP)

# Re-installs when the project's dependency list or the torch version / index changes.
$(STAMP): pyproject.toml $(VENV)/.torch-spec
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so that '.[all]' (torch>=2.4) keeps it instead of picking its own build.
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[all]'
	@touch $(STAMP)

# Rewritten only when TORCH_SPEC changes, so that a new version or index re-runs the install.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

# The real Triton server's own environment (its Python backend needs numpy<2): docs/triton.md.
triton-env: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed: pyproject.toml deploy/triton/setup-env.sh
	FORCE=1 PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) TORCH_INDEX_URL=$(TORCH_INDEX_URL) \
		deploy/triton/setup-env.sh $(TRITON_VENV)

# redis-server, chromium and docker-compose from Debian, when missing (the tests drive them).
system-packages:
	.ci/system-packages

test: system-packages setup triton-env typecheck
	$(BIN)/python -m pytest tests

# Type checking (settings in pyproject.toml, [tool.mypy]); incremental through .mypy_cache.
typecheck: setup
	$(BIN)/mypy

# The quick loop before a commit (under 3 minutes on 2 cores): lint, types, and the unit tests
# that start no server, no Redis and no process topology. Named by file, wherever under tests/
# the file lives; `make test` runs everything.
CHECK_TESTS := test_cli test_dependencies test_prompts test_classes test_annotations test_matcher \
	test_hoi_losses test_eval_boxes test_eval_hico test_eval_vcoco test_postprocess test_transforms \
	test_config test_settings test_student_main test_docs test_distill test_detector test_transformer \
	test_decoders test_eval_predictions test_hoi_dataset test_batcher test_logs test_proto_stubs
CHECK_FILES = $(foreach name,$(CHECK_TESTS),$(firstword $(wildcard tests/$(name).py tests/*/$(name).py)))

check: lint typecheck
	@test $(words $(CHECK_FILES)) -eq $(words $(CHECK_TESTS)) || \
		{ echo "make check: a file of CHECK_TESTS is missing under tests/ (found: $(CHECK_FILES))"; exit 1; }
	$(BIN)/python -m pytest -q -m "not slow" $(CHECK_FILES)

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

# What only real GPUs show (docs/gpu-check.md): every check on a CUDA host (under 10 minutes on one
# GPU), the CPU parts and a list of the skipped CUDA ones elsewhere. Last line: one JSON object.
gpu-check: setup
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache build *.egg-info
