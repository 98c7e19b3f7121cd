# collnet: the coordinator, the peer daemon and the client SDK in one small image
# (with the lab of `collnet up` / `collnet chaos`).
#
#   docker build -t collnet .                                   # python:3.11-slim
#   docker build -t collnet --build-arg BASE_IMAGE=collnet-base:bookworm .
#
# BASE_IMAGE is any Debian-like image with python3 (>= 3.11) and its venv
# module; deploy/churn/base-image.sh makes one with debootstrap where no
# registry can be reached. Python packages come from deploy/wheelhouse/ when
# it holds them (build with --build-arg PIP_NO_INDEX=1 to use nothing else),
# otherwise from the index in PIP_INDEX_URL (default PyPI).
#
# Run:  docker run collnet coordinator | daemon | healthcheck | <any command>
# Settings: COLLNET_* environment variables or a KEY=VALUE file at
# $COLLNET_CONFIG (default /etc/collnet/collnet.conf); see deploy/README.md.
# The trainer image (torch + examples/) is deploy/trainer/Dockerfile, FROM this one.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_FIND_LINKS=/wheels \
    PYTHONDONTWRITEBYTECODE=1

# A C compiler for the optional accelerator of the min-max codec. Best effort:
# without one (no apt mirror reachable) the build says so and the image uses
# the bit-identical numpy path.
RUN set -eu; \
    has_headers() { python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; }; \
    if command -v cc >/dev/null 2>&1 && has_headers; then exit 0; fi; \
    pkgs="gcc libc6-dev"; \
    has_headers || pkgs="$pkgs python3-dev"; \
    if command -v apt-get >/dev/null 2>&1 \
       && apt-get update -q \
       && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs; then \
      rm -rf /var/lib/apt/lists/*; \
    else \
      echo "collnet build: WARNING: no C compiler; collnet.codec._minmax is skipped (numpy path)"; \
    fi

RUN python3 -m venv /opt/collnet
COPY deploy/build-env.sh /usr/local/bin/collnet-build-env
COPY deploy/wheelhouse/ /wheels/
# Dependencies first: this layer stays cached while only the source changes.
COPY pyproject.toml setup.py README.md LICENSE /src/
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && collnet-build-env /opt/collnet/bin/pip install --quiet -r /tmp/requirements.txt
COPY collnet /src/collnet
COPY daemon /src/daemon
COPY lab /src/lab
COPY clients /src/clients
RUN collnet-build-env /opt/collnet/bin/pip install --quiet --no-deps /src \
 && /opt/collnet/bin/python -c 'import importlib.util as u; print("collnet build: C accelerator", "built" if u.find_spec("collnet.codec._minmax") else "NOT built (numpy path)")' \
 && /opt/collnet/bin/collnet --version \
 && /opt/collnet/bin/collnet --help >/dev/null


FROM ${BASE_IMAGE} AS collnet
LABEL org.opencontainers.image.title="collnet" \
      org.opencontainers.image.description="collnet coordinator, peer daemon and client SDK" \
      org.opencontainers.image.licenses="Apache-2.0"

# One fixed uid/gid, shared with the trainer image: shared-memory segments are
# created 0600 by the trainer and opened by the daemon, so both run as 10001.
RUN groupadd --system --gid 10001 collnet \
 && useradd --system --uid 10001 --gid collnet --home-dir /home/collnet --create-home \
            --shell /usr/sbin/nologin collnet \
 && mkdir -p /run/collnet /etc/collnet \
 && chown collnet:collnet /run/collnet

COPY --from=build /opt/collnet /opt/collnet
COPY deploy/docker-entrypoint.sh /usr/local/bin/collnet-entrypoint

ENV PATH=/opt/collnet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COLLNET_CONFIG=/etc/collnet/collnet.conf

USER collnet
WORKDIR /home/collnet
# coordinator control port, daemon data port, metrics (COLLNET_METRICS_PORT=29600)
EXPOSE 29400 29500 29600
HEALTHCHECK --interval=5s --timeout=8s --start-period=30s --retries=3 \
    CMD ["collnet-entrypoint", "healthcheck"]
ENTRYPOINT ["collnet-entrypoint"]
CMD ["daemon"]
