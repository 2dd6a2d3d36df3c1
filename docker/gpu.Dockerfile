# GPU image: the HTTP service (default command) and the training jobs on the CUDA build of PyTorch.
# Build from the repository root:   docker build -f docker/gpu.Dockerfile -t llmemb:gpu .
# Run (NVIDIA Container Toolkit; CUDA 13.0 needs host driver >= 580):
#   docker run --gpus all -p 127.0.0.1:8000:8000 -e LLMEMB_API_KEYS -v llmemb_artifacts:/artifacts llmemb:gpu
# docs/DOCKER.md has the compose setup (trainer profile, volumes, CPU override).
#
# torch==2.13.0 from PyPI is the CUDA 13.0 build and brings its own CUDA and cuDNN libraries as pip packages, so
# the base image's CUDA major is matched to it (the base image also makes the container toolkit check the driver).
# Another CUDA line (older driver): change FROM (kept literal so hadolint checks the pin) and build with
#   --build-arg LLMEMB_TORCH_SPEC=torch==<version>+cuXYZ --build-arg TORCH_INDEX=<PyTorch's cuXYZ wheel index>.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ARG LLMEMB_TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=
ARG DEBIAN_FRONTEND=noninteractive

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 \
    LLMEMB_ARTIFACTS=/artifacts LLMEMB_DATA_DIR=/data LLMEMB_CACHE_DIR=/data/cache \
    LLMEMB_HOST=0.0.0.0 LLMEMB_PORT=8000

# Python from the distribution; version pins would break as the archive drops superseded builds, and the base
# image tag already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 llmemb \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin llmemb

WORKDIR /app
# Cache layer only: torch (several GB with CUDA) is installed before the sources are copied, with the same spec
# the install script uses below, so a source change does not download it again. scripts/install.sh then finds it.
RUN python3 -m venv "$VENV" \
    && if [ -n "$TORCH_INDEX" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX"; fi \
    && "$VENV/bin/python" -m pip install -q "$LLMEMB_TORCH_SPEC"

COPY . /app
# The same install script CI runs (`make test` -> scripts/install.sh), so the image's install step is exercised on
# every CI run. The venv and sources stay root-owned; the service user writes only /artifacts, /data and runs/.
# /app/data and /app/artifacts link to the volumes, so relative defaults (data/cache, artifacts/) land there too.
RUN if [ -n "$TORCH_INDEX" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX"; fi \
    && PYTHON=python3 scripts/install.sh \
    && mkdir -p /artifacts/overlays /data/cache /app/runs \
    && ln -s /data /app/data && ln -s /artifacts /app/artifacts \
    && chown -R 10001:10001 /artifacts /data /app/runs

USER 10001:10001
EXPOSE 8000
# /ready answers 200 once the bundle is loaded and warmed up, 503 before: urlopen raises on 503, so exit 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LLMEMB_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["llmemb"]
CMD ["serve", "--host", "0.0.0.0"]
