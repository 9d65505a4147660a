# roomcast — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test test-deps lint build clean

## A single node on the embedded memory broker (no Redis needed); prints a token and examples.
run:
	$(CARGO) run --release -p roomcast -- serve --dev

## The whole suite: installs what the tests need when missing, then lint + every test.
test: test-deps lint
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

## Tools the tests use: a real redis-server (7+, for sharded pub/sub) and redis-cli.
test-deps:
	@if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then \
		echo "installing redis-server and redis-tools (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; \
	fi
	@redis-server --version

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

build:
	$(CARGO) build --release -p roomcast

clean:
	$(CARGO) clean
