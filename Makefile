# The two commands of the README: `make demo` (the main job) and `make test`; `make demo-seeds`
# runs the demo for five seeds.
# Both set up what they need first (scripts/setup_env.sh: a .venv, torch==2.13.0 only
# if no torch is importable, fastclip with its compiled kernels; `make demo` without an
# NVIDIA GPU skips the CUDA kernels, `make test` builds them).
# Release: `make wheel` builds dist/fastclip_fused-*-manylinux_2_28_x86_64.whl and the
# sdist (scripts/build_wheel.sh); `make wheel-test` installs that wheel into a fresh venv
# with a CPU torch and runs the suite against it (scripts/test_wheel.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export FASTCLIP_VENV := $(VENV)

.PHONY: demo demo-seeds test lint sanitize bench setup clean wheel wheel-test

demo:
	@bash scripts/setup_env.sh
	$(PY) -m fastclip train

# The demo for seeds 0-4 (each run exactly as `make demo` runs it), scored also on a second,
# independently written renderer; writes runs/demo-seeds/table.md (the README's table).
demo-seeds:
	@bash scripts/setup_env.sh
	$(PY) scripts/demo_seeds.py

test:
	@bash scripts/setup_env.sh --test
	$(PY) -m pytest -q

# The C++ CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer, under the
# tests that call them (scripts/sanitize_cpu.sh; about 4 minutes on 2 cores).
sanitize:
	@bash scripts/setup_env.sh --test
	bash scripts/sanitize_cpu.sh

# ruff, pinned, with the configuration in pyproject.toml ([tool.ruff]).
lint:
	@bash scripts/setup_env.sh --test
	@$(PY) -c "import ruff" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "ruff==0.17.6"
	$(PY) -m ruff check src tests benchmarks scripts

bench:
	@bash scripts/setup_env.sh
	$(PY) -m fastclip bench --device cpu --overwrite

setup:
	@bash scripts/setup_env.sh --test

wheel:
	bash scripts/build_wheel.sh --sdist

wheel-test:
	bash scripts/test_wheel.sh

clean:
	rm -rf build dist $(VENV) runs
