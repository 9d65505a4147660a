# syntax=docker/dockerfile:1
#
# roomcast edge node image.
#
#   docker build -t roomcast .
#   docker run --rm -p 8080:8080 -e ROOMCAST_JWT_SECRET=... roomcast
#
# Build stage: the release binary (BuildKit cache mounts keep the cargo
# registry and target dir between builds). Runtime stage: Debian slim with
# curl for the HEALTHCHECK, running as an unprivileged user.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p roomcast \
    && install -m 0755 target/release/roomcast /usr/local/bin/roomcast

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# curl answers the HEALTHCHECK; ca-certificates are the system roots a rediss://
# Redis's certificate is checked against when no CA file is given.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 roomcast \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin roomcast
COPY --from=builder /usr/local/bin/roomcast /usr/local/bin/roomcast
COPY docs/roomcast.example.toml /etc/roomcast/roomcast.example.toml

# Defaults only; secrets (ROOMCAST_JWT_SECRET, ROOMCAST_API_KEYS) and the
# broker (ROOMCAST_REDIS / ROOMCAST_REDIS_CLUSTER) come from the deployment.
# Every `roomcast serve` flag has a ROOMCAST_* variable (roomcast serve --help).
ENV ROOMCAST_LISTEN=0.0.0.0:8080 \
    ROOMCAST_LOG_FORMAT=json \
    RUST_LOG=info

USER 10001:10001
EXPOSE 8080
# roomcast drains on SIGTERM: /readyz fails, the listener closes and sockets
# are closed with 1001 over drain_window (default 10 s) + up to 5 s. Give
# `docker stop -t` / the orchestrator's grace period more than that.
STOPSIGNAL SIGTERM
# Liveness on the port ROOMCAST_LISTEN names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null \"http://127.0.0.1:${ROOMCAST_LISTEN##*:}/healthz\" || exit 1"]

ENTRYPOINT ["/usr/local/bin/roomcast"]
CMD ["serve"]
