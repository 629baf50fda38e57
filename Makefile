# One source of truth for set-up: every target builds/updates .venv itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OUT     ?= runs/demo
export HF_HUB_OFFLINE=1
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export RAY_USAGE_STATS_ENABLED=0

.PHONY: demo test test-all bench data browser venv clean

demo: $(STAMP) data
	$(BIN)/fedcondense demo --recipe demo --out $(OUT)

# Two pytest-xdist workers, one test file each at a time (module fixtures stay in one worker); they
# share the session's checkpoint cache and the cores, idle threads sleeping (tests/conftest.py).
test: $(STAMP) data browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" --durations=10

test-all: $(STAMP) data browser
	$(BIN)/python -m pytest -q

bench: $(STAMP) data
	$(BIN)/fedcondense bench --out benchmarks/results

venv: $(STAMP)

# torch/torchvision pinned to the pair that lies on these machines' disk (see DEVELOPERS.md);
# pyproject keeps a loose range for users elsewhere.
# Bytecode: pip would compile all ~15,000 files (~60 s on 2 cores); instead the packages that every Flower
# and Ray process imports are compiled whole, and the rest as the project's entry points import them
# (~4,300 files), with writing allowed even where PYTHONDONTWRITEBYTECODE is set.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile -U pip
	$(BIN)/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m compileall -q -j 2 client server shared \
	  $$($(BIN)/python -c 'import importlib.util as u; print(*(u.find_spec(n).submodule_search_locations[0] for n in ("flwr", "ray")))')
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c \
	  "import server.cli, server.federation.app, client.app, flwr.simulation, matplotlib.pyplot, pytest, xdist"
	touch $(STAMP)

# Default dataset: full Fashion-MNIST from Debian (offline, see docs/data.md).
data:
	@test -f $(DATA) || { echo "installing dataset-fashion-mnist (Debian)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

# Headless Chromium for the audit-page test (Debian package; no browser download at run time).
browser:
	@command -v chromium >/dev/null || { echo "installing chromium (Debian)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf runs .pytest_cache
