# The two commands of the README: `make run` (a throw-away daemon) and `make test` (the suite).
SHELL := /bin/bash
VENV := .venv
RUN_DIR := $(CURDIR)/.run

.PHONY: setup run test bench install clean

setup:
	@scripts/setup.sh

run: setup
	PORTMETER_STATE_DIR=$(RUN_DIR)/state \
	PORTMETER_SOCKET=$(RUN_DIR)/portmeter.sock \
	PORTMETER_XRAY_CONFIG=$(RUN_DIR)/xray/config.json \
	PORTMETER_REALITY_DEST=$${PORTMETER_REALITY_DEST:-www.example.com:443} \
	PORTMETER_PUBLIC_HOST=$${PORTMETER_PUBLIC_HOST:-127.0.0.1} \
	PORTMETER_POLL_INTERVAL=2 \
	$(VENV)/bin/portmeter run

test: setup
	$(VENV)/bin/pytest

# The benchmark suite (as root: namespaces, nftables, iperf3); prints tables, appends to bench/RESULTS.md.
bench: setup
	$(VENV)/bin/python -m bench.run_all

install:
	scripts/install.sh

clean:
	rm -rf $(RUN_DIR)
