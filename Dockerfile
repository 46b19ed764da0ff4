# lossd on the CPU, with the CPU build of torch (pinned). Dockerfile.gpu is the CUDA image.
#   docker build -t lossd:cpu .
#   docker run --rm -p 8000:8000 -p 50051:50051 lossd:cpu
# BASE: any Debian-like image with python3 (3.10-3.13) and its venv module.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# a folder of local wheels, mounted at build time, for builds without access to TORCH_INDEX_URL
ARG PIP_FIND_LINKS

ENV VIRTUAL_ENV=/opt/lossd \
    PATH=/opt/lossd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/opt/numba-cache \
    LOSSD_HOST=0.0.0.0 \
    LOSSD_HTTP_PORT=8000 \
    LOSSD_GRPC_PORT=50051 \
    LOSSD_DEVICE=cpu

# torch first, in a layer of its own: it is most of the image and changes least
RUN python3 -m venv /opt/lossd \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}"

WORKDIR /app
# then the other dependencies, read from pyproject.toml, and the client (small, and a dependency of the
# server): an edit to service/ rebuilds only the layers below
COPY pyproject.toml ./
COPY client ./client
RUN python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith('lossd-client')))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt ./client \
    && rm /tmp/requirements.txt

COPY README.md LICENSE ./
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 lossd \
    && mkdir -p "$NUMBA_CACHE_DIR" && chown 10001 "$NUMBA_CACHE_DIR"

USER 10001
# compile the CPU kernels into numba's cache (written as the user the server runs as), so that a container's
# start-up loads them instead of compiling them
RUN python3 -c "from lossd.engine.fastpath import warm_cpu_kernels; warm_cpu_kernels()"
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]
ENTRYPOINT ["lossd", "serve"]
