# replicator — the two commands: `make run` and `make test`.
# Everything a target needs is installed or started by the project's own files.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help run test test-fast lint bench kafka-start kafka-stop clean

help:
	@echo "make run    - local Kafka (unless KAFKA_BOOTSTRAP_SERVERS is set) + replicator + demo publisher"
	@echo "make test   - lint, type-check and the whole test suite against a real broker"
	@echo "make bench  - benchmarks; writes bench/results/latest.json"
	@echo "make clean  - remove the virtualenv and ./var (local data!)"

$(STAMP): pyproject.toml setup.py replicator/restore/_fold.c replicator/restore/_rows.c \
          replicator/restore/_rows_sqlite.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@mkdir -p var
	@$(PY) -m pip install -q --upgrade pip > var/install.log 2>&1 || (cat var/install.log; exit 1)
	@echo "installing replicator and its dependencies into $(VENV) ..."
	@$(PY) -m pip install -q -e '.[dev]' >> var/install.log 2>&1 || (cat var/install.log; exit 1)
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@bash deploy/run-local.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check replicator tests bench
	$(VENV)/bin/mypy

test: lint
	bash deploy/kafka/kafka.sh fetch
	bash deploy/s3/s3.sh fetch
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(STAMP)
	bash deploy/kafka/kafka.sh fetch
	bash deploy/s3/s3.sh fetch
	$(PY) -m bench.run

kafka-start: $(STAMP)
	@bash deploy/kafka/kafka.sh start --dir var/kafka

kafka-stop:
	@bash deploy/kafka/kafka.sh stop --dir var/kafka

clean:
	-bash deploy/kafka/kafka.sh stop --dir var/kafka
	rm -rf $(VENV) var *.egg-info
