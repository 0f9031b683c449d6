# syntax=docker/dockerfile:1
# One image for every process: `loyalty serve` (the default command), `loyalty worker`,
# `loyalty migrate`, `loyalty keys ...`. See docs/deployment.md.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/loyalty
COPY pyproject.toml README.md ./
COPY loyalty ./loyalty
COPY alembic ./alembic
RUN /opt/loyalty/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/loyalty/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOYALTY_LOG_FORMAT=json \
    LOYALTY_DATABASE_URL=sqlite:////data/loyalty.db
RUN groupadd --system --gid 10001 loyalty \
    && useradd --system --uid 10001 --gid loyalty --home-dir /data --shell /usr/sbin/nologin loyalty \
    && mkdir -p /data \
    && chown loyalty:loyalty /data
COPY --from=build /opt/loyalty /opt/loyalty
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000
# /healthz answers as soon as the process serves HTTP (it does not touch the database;
# /readyz does). Worker containers have no HTTP API: compose overrides this check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["loyalty"]
# `serve` enforces the edge limits itself (header size/count, header and body read
# timeouts, LOYALTY_HTTP_MAX_CONNECTIONS; README "Abuse limits"): give the container an
# open-file limit above that cap + 256 (docker run --ulimit nofile=4096). Metrics are
# not on port 8000: set LOYALTY_METRICS_PORT (with LOYALTY_METRICS_HOST=0.0.0.0) to
# scrape them from another container.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
