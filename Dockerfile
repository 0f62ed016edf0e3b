# syntax=docker/dockerfile:1
#
# Chorus node image: `docker build -t chorus:0.1.0 .` from the repository root.
# Runs `chorus` as an unprivileged user; see k8s/README.md for the cluster setup.

# ---- build -------------------------------------------------------------------
# rust-version in Cargo.toml is 1.85; any newer stable 1.x on bookworm works.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit); the
# binary is copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin chorus \
    && install -D -m 0755 target/release/chorus /out/chorus

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates only for outbound TLS to public endpoints; inter-node and
# client TLS use the cluster CA. /bin/sh, getent and sleep (used by the k8s
# start script and preStop hook) come with the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 chorus \
    && useradd --system --uid 10001 --gid chorus --home-dir /var/lib/chorus \
       --shell /usr/sbin/nologin chorus \
    && install -d -o chorus -g chorus -m 0750 /var/lib/chorus
COPY --from=build /out/chorus /usr/local/bin/chorus
USER 10001:10001
WORKDIR /var/lib/chorus
# 7070/tcp: HTTP (WebSocket /ws, /healthz, /readyz; /metrics, /admin/* unless
#           --admin-addr is given)
# 7071/udp: client QUIC   7072/udp: inter-node QUIC (mutual TLS)
# 7073/tcp: admin HTTP (/admin/*, /metrics) with --admin-addr 0.0.0.0:7073 (k8s/)
EXPOSE 7070/tcp 7071/udp 7072/udp 7073/tcp
ENTRYPOINT ["/usr/local/bin/chorus"]
CMD ["serve", "--data-dir", "/var/lib/chorus", "--http-addr", "0.0.0.0:7070", "--quic-addr", "0.0.0.0:7071"]
