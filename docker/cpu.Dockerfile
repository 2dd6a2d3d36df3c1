# CPU image: the training jobs (and, later, the service) on the CPU build of PyTorch.
# Build from the repository root: docker build -f docker/cpu.Dockerfile -t llmemb:cpu .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    LLMEMB_DATA_DIR=/data LLMEMB_CACHE_DIR=/data/cache

RUN useradd --create-home --uid 10001 llmemb
WORKDIR /app
COPY --chown=llmemb:llmemb . /app
# The same install script CI runs, so the image's install step is exercised on every CI run.
RUN scripts/install.sh && mkdir -p /data /app/runs && chown -R llmemb:llmemb /data /app /opt/venv
USER llmemb
VOLUME ["/data", "/app/runs"]
ENTRYPOINT ["llmemb"]
CMD ["train", "srs", "--dataset", "ml-100k", "--backbone", "sasrec", "--seeds", "42"]
