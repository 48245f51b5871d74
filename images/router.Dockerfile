# syntax=docker/dockerfile:1
# The UCM prefill/decode router: aiohttp (the client-facing server), httptools (the pooled upstream
# client's parser), uvloop, the asyncio Kubernetes client (EndpointSlice discovery) and the
# Prometheus client. No torch, no vLLM, no kopf.
#
# Build from the repository root:
#   docker build -f images/router.Dockerfile -t REGISTRY/ucm-router:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ucm/ ucm/
COPY operator/ operator/
RUN python -m venv /opt/ucm \
 && /opt/ucm/bin/pip install ".[router]" \
 && /opt/ucm/bin/ucm router serve --help >/dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 ucm \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ucm
COPY --from=build /opt/ucm /opt/ucm
ENV PATH=/opt/ucm/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8000
# The operator's router Deployment passes the rest: --model, --discovery kubernetes, ...
ENTRYPOINT ["ucm", "router", "serve"]
