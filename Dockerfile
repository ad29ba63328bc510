# fastingest: build the wheel (compiled queue core) in one stage, run only that wheel in another.
#   docker build -t fastingest .
#   docker run -p 127.0.0.1:8000:8000 -v fastingest-data:/var/lib/fastingest fastingest

# The base: any image with Python 3.11, pip and a venv first on PATH (.ci/container_check.py
# builds one from a Debian mirror where no registry is reachable).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# A C compiler for the Cython extension; nothing of this stage reaches the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN pip install --no-cache-dir build==1.2.2.post1 \
    && python -m build --wheel --outdir /dist

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/fastingest fastingest
COPY --from=build /dist/ /tmp/dist/
# The version pins the wheel just built (keep it equal to pyproject.toml's); the
# dependencies are pinned to the versions the benchmarks ran with.
ARG VERSION=0.1.0
RUN pip install --no-cache-dir --find-links /tmp/dist \
        "fastingest==${VERSION}" httptools==0.9.0 uvloop==0.23.0 zstandard==0.25.0 zlib-ng==1.1.0 \
    && rm -rf /tmp/dist
USER 10001
WORKDIR /var/lib/fastingest
# Spool, dead letters and the default local sink live here: keep it across container restarts.
VOLUME ["/var/lib/fastingest"]
ENV FASTINGEST_LISTEN=0.0.0.0:8000 \
    FASTINGEST_DATA_DIR=/var/lib/fastingest \
    FASTINGEST_LOG_FORMAT=json \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000
# The probe follows FASTINGEST_LISTEN's port, so it holds on the host network too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ['FASTINGEST_LISTEN'].rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
# fastingest is PID 1 and drains on SIGTERM itself (with --processes, its supervisor forwards it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastingest", "serve"]
