# Herald's container image: the `herald` binary on a small Debian base, run as a non-root user.
#
#   docker build -t herald .          (or: podman build --format docker -t herald .)
#   docker run --rm -p 8080:8080 -e HERALD_API_KEYS=... -e HERALD_JWT_HS256_SECRET=... herald
#   docker run --rm -p 8080:8080 -e HERALD_INSECURE=true herald      # a local trial without credentials
#
# Configuration is the binary's own: HERALD_* variables, a TOML file named by HERALD_CONFIG, or flags
# after the image name (docs/config.md). The image only moves the listen address off loopback.
# Kubernetes manifests that use this image: deploy/kubernetes (deploy/README.md).

# --- builder: compiles `herald` in release ------------------------------------------------------------
# The Rust version matches the toolchain the project is developed and tested with.
FROM docker.io/library/rust:1.95-slim-bookworm AS builder
# make: tikv-jemalloc-sys builds jemalloc with its own configure script and make (the slim image has gcc
# and libc6-dev, not make).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between builds (BuildKit and
# buildah/podman both honour them), so a rebuild after a code change compiles Herald's own crates only.
# Debug info is left out of the image's binary (the release profile keeps some, debug = 1, for profiling on
# a developer's machine); code generation is the same.
RUN --mount=type=cache,id=herald-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=herald-release-target,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --locked -p herald-server --bin herald \
    && install -D -m 0755 target/release/herald /out/herald

# --- runtime ------------------------------------------------------------------------------------------
FROM docker.io/library/debian:bookworm-slim
# ca-certificates: rediss://, tls:// (NATS) and an https OTLP endpoint verify servers against the
# system's trust store unless a CA file is configured.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 herald \
    && useradd --system --uid 10001 --gid herald --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin herald
COPY --from=builder /out/herald /usr/local/bin/herald

# Inside a container the node must be reachable from outside its network namespace. Herald still
# refuses to serve a non-loopback address without API keys or client authentication (set them, or
# HERALD_INSECURE=true for a trial). For an IPv6-only network use HERALD_LISTEN=[::]:8080.
ENV HERALD_LISTEN=0.0.0.0:8080
EXPOSE 8080
# A numeric user, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# herald has no probe subcommand and the image has no curl: bash (part of every Debian base) sends the
# request over its /dev/tcp and checks the status line. The port follows HERALD_LISTEN. Kubernetes
# ignores HEALTHCHECK and uses the probes of deploy/kubernetes instead; podman keeps it only in the
# docker image format (--format docker).
HEALTHCHECK --interval=10s --timeout=3s --start-period=40s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>\"/dev/tcp/127.0.0.1/${HERALD_LISTEN##*:}\" && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]

# SIGTERM starts Herald's graceful shutdown: /readyz fails, new connections are refused, connected
# clients are told to reconnect elsewhere over drain_window_ms (3 s), and the process exits within
# shutdown_grace_secs (10 s); a second signal exits at once. Give `docker stop` more than the grace
# period (docker stop -t 15, or --stop-timeout 15 on docker run) so it does not kill the drain.
STOPSIGNAL SIGTERM
# Every connection is an open file, and limits.max_sockets (about 23,000 with the manifests' 20,000
# connections) must stay under the process's limit. Some container runtimes (containerd 2 under
# systemd) start containers with a soft limit of 1,024 and a far higher hard one: the entrypoint raises
# the soft limit to the hard one, then bash is replaced by herald (exec), which stays PID 1 and gets the
# signals. Arguments after the image name (Kubernetes' args) go to herald.
ENTRYPOINT ["/bin/bash", "-c", "ulimit -Sn \"$(ulimit -Hn)\" 2>/dev/null; exec /usr/local/bin/herald \"$@\"", "herald"]
