# syntax=docker/dockerfile:1
# The UCM operator image: kopf and the Kubernetes client only. No torch, no vLLM: the operator
# never imports them, and leaving them out keeps the image around 200 MB instead of 10 GB.
#
# Build from the repository root (the build context must be the repo, not images/):
#   docker build -f images/operator.Dockerfile -t REGISTRY/ucm-operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject.toml names README.md as the long description, so the build needs it.
COPY pyproject.toml README.md ./
COPY ucm/ ucm/
COPY operator/ operator/
RUN python -m venv /opt/ucm \
 && /opt/ucm/bin/pip install ".[operator]" \
 && /opt/ucm/bin/python -c "import ucm_operator, kopf" \
 && ! /opt/ucm/bin/python -c "import torch" 2>/dev/null \
 && ! /opt/ucm/bin/python -c "import vllm" 2>/dev/null

FROM ${PYTHON_IMAGE}
# A fixed numeric non-root user, so `runAsNonRoot: true` in the chart can verify it.
RUN groupadd --system --gid 10001 ucm \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ucm
COPY --from=build /opt/ucm /opt/ucm
ENV PATH=/opt/ucm/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
ENTRYPOINT ["ucm-operator"]
CMD ["run"]
