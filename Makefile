# pmu: every set-up step a fresh machine needs is here; `make demo` and `make test` are all a user runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := build/demo

.PHONY: all venv test lint demo bench clean retprobe

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m compileall -q pmu >/dev/null  # bytecode once, even where PYTHONDONTWRITEBYTECODE is set
	touch $(STAMP)

venv: $(STAMP)

# Tools the tests compare against (perf, sqlite3) and build with (gcc); installed only where missing.
.tools:
	@command -v gcc >/dev/null && command -v g++ >/dev/null && command -v perf >/dev/null && \
	  command -v sqlite3 >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq gcc g++ linux-perf sqlite3 libsqlite3-0 >/dev/null)
	@# Go builds the Go program of tests/integration/test_go.py; its tests skip where it cannot install.
	@command -v go >/dev/null || apt-get install -y -qq golang-go >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq golang-go >/dev/null 2>&1) || true
	@touch .tools

# The integration tests run twice: with jump-optimized probes (the default) and with --no-optimize.
test: $(STAMP) .tools lint
	$(PY) -m pytest -q tests
	PMU_TEST_NO_OPTIMIZE=1 $(PY) -m pytest -q tests/integration

# The return blob's machine code (pmu/trace/retprobe.py) from its source, retprobe.S (needs GNU as).
retprobe:
	$(PYTHON) tools/gen_retprobe.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pmu tests benchmarks tools
	$(VENV)/bin/ruff format --check pmu
	$(VENV)/bin/mypy --strict pmu

$(DEMO)/hot: tests/targets/hot.c
	mkdir -p $(DEMO)
	gcc -O1 -g -o $@ $<

demo: $(STAMP) $(DEMO)/hot
	@echo "== pmu stat: two probed functions in a small program"
	$(VENV)/bin/pmu stat -v -e uprobe:$(DEMO)/hot:work -e uprobe:$(DEMO)/hot:work2 -- $(DEMO)/hot 100000
	@echo "== the same with int3 probes (one ptrace stop per hit)"
	$(VENV)/bin/pmu stat --no-optimize -e uprobe:$(DEMO)/hot:work -- $(DEMO)/hot 20000
	@echo "== pmu stat: sqlite3_step in the sqlite3 shell, CSV as perf stat -x,"
	$(VENV)/bin/pmu stat -x, -e uprobe:libsqlite3:sqlite3_step -- sqlite3 :memory: \
	  'create table t(x); insert into t values (1),(2),(3); select * from t;'
	@echo "== pmu record: every hit, recorded inside the process, to Parquet; then pmu report"
	$(VENV)/bin/pmu record -v --args 1 -o $(DEMO)/hot.parquet -e uprobe:$(DEMO)/hot:work -- $(DEMO)/hot 100000
	$(VENV)/bin/pmu report -i $(DEMO)/hot.parquet
	@echo "== pmu list: probeable functions"
	$(VENV)/bin/pmu list $(DEMO)/hot 'work*'

# Each script replaces only its own section of RESULTS.md; about 1-3 minutes each.
bench: $(STAMP) .tools
	@command -v ltrace >/dev/null || (apt-get update -qq && apt-get install -y -qq ltrace >/dev/null)
	$(PY) benchmarks/bench_stat.py --results benchmarks/RESULTS.md
	$(PY) benchmarks/bench_record.py --results benchmarks/RESULTS.md
	$(PY) benchmarks/bench_optimized.py --results benchmarks/RESULTS.md
	$(PY) benchmarks/bench_system_wide.py --results benchmarks/RESULTS.md
	$(PY) benchmarks/bench_cpython.py --results benchmarks/RESULTS.md

clean:
	rm -rf build .tools .pytest_cache .mypy_cache .ruff_cache
