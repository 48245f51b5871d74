# syntax=docker/dockerfile:1
# The vLLM worker image: the upstream vLLM OpenAI server at the version pyproject.toml pins
# (vllm==0.32.0; tests/test_images.py keeps the two in step) plus the `ucm` package, whose
# `vllm.general_plugins` entry point makes `"kv_connector": "UCMConnector"` resolvable.
#
# Build from the repository root:
#   docker build -f images/worker.Dockerfile -t REGISTRY/ucm-worker:0.1.0 .
FROM vllm/vllm-openai:v0.32.0

# Absolute destinations and no WORKDIR: the base image's working directory stays as vLLM set it.
COPY pyproject.toml README.md /opt/ucm-src/
COPY ucm/ /opt/ucm-src/ucm/
COPY operator/ /opt/ucm-src/operator/
# Plain `pip install .`, not `.[worker]`: torch and vLLM already come with the base image, and
# re-resolving them could replace its CUDA build. The check fails the build if the plugin entry
# point did not register (vLLM would then reject kv_connector=UCMConnector at start-up).
RUN python3 -m pip install --no-cache-dir /opt/ucm-src \
 && python3 -c "from importlib.metadata import entry_points as e; \
eps = {p.name: p.value for p in e(group='vllm.general_plugins')}; \
assert eps.get('ucm') == 'ucm.connector.plugin:register', eps"
ENTRYPOINT ["vllm", "serve"]
