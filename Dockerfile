# syntax=docker/dockerfile:1
#
# openbroker container image: brokerd (the daemon) and brokerctl (the admin CLI).
#
#   docker build -t openbroker:0.1.0 .
#   docker run -d --name openbroker -p 8080:8080 -p 8081:8081 -p 8082:8082 \
#     -v openbroker-data:/var/lib/openbroker \
#     -v "$PWD/brokerd.toml:/etc/openbroker/brokerd.toml:ro" openbroker:0.1.0
#
# packaging/README.md has the long form (making an admin token, TLS, upgrades).
#
# Configuration: the image's /etc/openbroker/brokerd.toml is packaging/container.toml, not
# config/brokerd.example.toml. The example listens on 127.0.0.1, which inside a container is
# reachable only from the container itself: a container config must listen on 0.0.0.0 (or "::")
# for the published ports to work. container.toml does that for all three listeners, keeps the
# database in the /var/lib/openbroker volume, logs JSON to standard error and declares no site
# objects. Its admin token hash is a placeholder that matches no token: mount your own config
# (as above), or at least replace the sha256, before using the admin API. The fully commented
# example is in the image as /etc/openbroker/brokerd.example.toml for reference.
#
# Health check: none. The runtime image has no curl or wget, and brokerd has no self-probe; let
# the orchestrator probe GET /healthz (liveness, no token) and GET /readyz (readiness; listed in
# [admin] unauthenticated_paths in container.toml) on port 8082.
#
# Stopping: `docker stop` sends SIGTERM and kills after 10 s by default; brokerd finishes
# in-flight requests for [daemon] shutdown_grace_seconds (10 in container.toml), so give it a
# little longer: `docker stop -t 20`, or `stop_grace_period: 20s` in compose.

# ---- build stage ---------------------------------------------------------------------------------
FROM debian:bookworm AS build

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build ccache pkg-config \
      libboost1.81-dev libboost-json1.81-dev libpugixml-dev libsqlite3-dev libssl-dev \
      libspdlog-dev doctest-dev libtomlplusplus-dev libvirt-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# CMakeLists.txt picks up ccache by itself; the cache mount (BuildKit) keeps it between builds.
ENV CCACHE_DIR=/root/.cache/ccache
RUN --mount=type=cache,target=/root/.cache/ccache \
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DOPENBROKER_TESTS=OFF \
 && ninja -C build brokerd brokerctl \
 && install -d /out \
 && install -m 0755 -s build/apps/brokerd build/apps/brokerctl /out/

# ---- runtime stage -------------------------------------------------------------------------------
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libboost-json1.81.0 libpugixml1v5 libsqlite3-0 libssl3 libspdlog1.10 libtomlplusplus3 libvirt0 \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# An unprivileged system user; the database volume belongs to it.
RUN groupadd --system openbroker \
 && useradd --system --gid openbroker --home-dir /var/lib/openbroker --no-create-home \
      --shell /usr/sbin/nologin --comment "openbroker daemon" openbroker \
 && install -d -o openbroker -g openbroker -m 0750 /var/lib/openbroker \
 && install -d -o root -g openbroker -m 0750 /etc/openbroker

COPY --from=build /out/brokerd /out/brokerctl /usr/local/bin/
COPY --chown=root:openbroker --chmod=0640 packaging/container.toml /etc/openbroker/brokerd.toml
COPY --chown=root:openbroker --chmod=0640 config/brokerd.example.toml /etc/openbroker/brokerd.example.toml

VOLUME /var/lib/openbroker
# 8080 NFuse XML service (front ends), 8081 agent endpoint (VDAs), 8082 admin API, health, metrics.
EXPOSE 8080 8081 8082

USER openbroker
WORKDIR /var/lib/openbroker
STOPSIGNAL SIGTERM
ENTRYPOINT ["brokerd"]
CMD ["--config", "/etc/openbroker/brokerd.toml"]
