# The two commands of the README: `make run` (a throw-away daemon) and `make test` (the suite).
SHELL := /bin/bash
VENV := .venv
RUN_DIR := $(CURDIR)/.run

.PHONY: setup setup-test run test test-fast test-kernel lint bench install clean

setup:
	@scripts/setup.sh

# What only the suite needs on top (PostgreSQL 15 for the fleet tests).
setup-test:
	@scripts/setup.sh --test

run: setup
	PORTMETER_STATE_DIR=$(RUN_DIR)/state \
	PORTMETER_SOCKET=$(RUN_DIR)/portmeter.sock \
	PORTMETER_XRAY_CONFIG=$(RUN_DIR)/xray/config.json \
	PORTMETER_REALITY_DEST=$${PORTMETER_REALITY_DEST:-www.example.com:443} \
	PORTMETER_PUBLIC_HOST=$${PORTMETER_PUBLIC_HOST:-127.0.0.1} \
	PORTMETER_POLL_INTERVAL=2 \
	$(VENV)/bin/portmeter run

# The whole suite: the checks, the in-process layer (no root, fails fast), then the kernel layer
# (root: network namespaces, nftables, real daemons). pytest exits 5 when it collected nothing:
# make stops there too.
test: setup-test
	@$(MAKE) --no-print-directory lint test-fast test-kernel

lint: setup-test
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/ruff format --check daemon
	$(VENV)/bin/mypy daemon

test-fast: setup-test
	$(VENV)/bin/pytest -m "not kernel and not systemd and not root"

test-kernel: setup-test
	$(VENV)/bin/pytest -m "kernel or systemd or root" --durations=10

# The benchmark suite (as root: namespaces, nftables, iperf3); prints tables, appends to bench/RESULTS.md.
bench: setup-test
	$(VENV)/bin/python -m bench.run_all

install:
	scripts/install.sh

clean:
	rm -rf $(RUN_DIR)
