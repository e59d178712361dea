# endcap: `make demo` and `make test` are the two commands a newcomer needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 50051
METRICS_PORT ?= 9100
STAMP := $(VENV)/.installed

.PHONY: install demo test proto lint typecheck bench clean

install: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on disk, and with it installed the
# project's torch range is already satisfied, so pip never fetches a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[serve,train,bench,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/endcap demo --port $(PORT) --metrics-port $(METRICS_PORT)

test: install
	$(BIN)/python -m pytest -q

proto: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --mypy_out=proto \
		--grpc_python_out=proto --mypy_grpc_out=proto proto/endcap/v1/*.proto

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy server training endcap benchmarks tests

bench: install
	$(BIN)/endcap bench

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
