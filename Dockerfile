# lossd server image. torch comes from PyPI, whose Linux wheels carry CUDA: the same image runs on a GPU host
# (with the NVIDIA container toolkit; LOSSD_DEVICE=auto picks cuda) and on a CPU-only host.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOSSD_HOST=0.0.0.0 \
    LOSSD_HTTP_PORT=8000 \
    LOSSD_GRPC_PORT=50051 \
    LOSSD_DEVICE=auto

WORKDIR /app
COPY pyproject.toml README.md ./
COPY client ./client
COPY service ./service
RUN pip install --no-cache-dir ./client . \
    && useradd --create-home --uid 10001 lossd

USER 10001
# compile the CPU kernels into numba's cache (NUMBA_CACHE_DIR, written as the user the server runs as; ~16 s on
# 2 cores), so a container's start-up on the CPU loads them instead of compiling them again. Not built here: no
# Docker engine runs on these machines
RUN python -c "from lossd.engine.fastpath import warm_cpu_kernels; warm_cpu_kernels()"
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]
ENTRYPOINT ["lossd", "serve"]
