# CPU image: the HTTP service (default command) and the training jobs on the CPU build of PyTorch.
# Build from the repository root:   docker build -f docker/cpu.Dockerfile -t llmemb:cpu .
# Run:  docker run -p 127.0.0.1:8000:8000 -e LLMEMB_API_KEYS -v llmemb_artifacts:/artifacts llmemb:cpu
# docs/DOCKER.md has the compose setup (trainer profile, volumes, CPU override).
#
# Plain `torch==2.13.0` from PyPI is the CUDA build (GBs of CUDA libraries), so the CPU build is named explicitly
# (`+cpu`) and PyTorch's CPU wheel index is added as an extra index; everything else still resolves from PyPI.
FROM python:3.11-slim-bookworm

ARG LLMEMB_TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 \
    LLMEMB_ARTIFACTS=/artifacts LLMEMB_DATA_DIR=/data LLMEMB_CACHE_DIR=/data/cache \
    LLMEMB_HOST=0.0.0.0 LLMEMB_PORT=8000 LLMEMB_DEVICE=cpu

RUN groupadd --gid 10001 llmemb \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin llmemb

WORKDIR /app
# Cache layer only: torch is installed before the sources are copied, with the same spec the install script uses
# below, so a source change does not download it again. scripts/install.sh then finds it installed.
RUN python3 -m venv "$VENV" \
    && if [ -n "$TORCH_INDEX" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX"; fi \
    && "$VENV/bin/python" -m pip install -q "$LLMEMB_TORCH_SPEC"

COPY . /app
# The same install script CI runs (`make test` -> scripts/install.sh), so the image's install step is exercised on
# every CI run. The venv and sources stay root-owned; the service user writes only /artifacts, /data and runs/.
# /app/data and /app/artifacts link to the volumes, so relative defaults (data/cache, artifacts/) land there too.
RUN if [ -n "$TORCH_INDEX" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX"; fi \
    && scripts/install.sh \
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
