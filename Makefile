# The two commands of the README: `make demo` (the main job) and `make test`.
# Both set up what they need first (scripts/setup_env.sh: a .venv, torch==2.13.0 only
# if no torch is importable, fastclip with its compiled kernels).
VENV ?= .venv
PY := $(VENV)/bin/python
export FASTCLIP_VENV := $(VENV)

.PHONY: demo test bench setup clean

demo:
	@bash scripts/setup_env.sh
	$(PY) -m fastclip train

test:
	@bash scripts/setup_env.sh --test
	$(PY) -m pytest -q

bench:
	@bash scripts/setup_env.sh
	$(PY) -m fastclip bench --device cpu

setup:
	@bash scripts/setup_env.sh --test

clean:
	rm -rf build $(VENV) runs
