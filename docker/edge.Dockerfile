# Edge worker: the core plus ONNX Runtime, nothing else. An edge device has
# no room for torch, so this image must never pull it in (tests/test_compose.py
# checks the install line and the `edge` extra).
# Build context: the repository root (see .dockerignore). BASE_IMAGE: any
# Debian-like image with python3 (3.11+) and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/venv/bin:$PATH

# Trust the build host's extra CAs (docker/ca/*.crt), as pip must behind a
# TLS-inspecting proxy; a virtual environment, since Debian's python3 refuses
# system-wide pip installs.
COPY docker/ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first, from the project file and the pins alone (an empty
# README stands in for the one pyproject.toml names), so that a source change
# rebuilds only the last layer.
COPY pyproject.toml constraints.txt /app/
RUN touch README.md && pip install -c constraints.txt ".[edge]" \
    && ! pip show torch >/dev/null 2>&1
COPY . /app
RUN pip install --no-deps -c constraints.txt .

# Models come from the `models` volume, mounted read-only at /models.
EXPOSE 8001
CMD ["apdispatch", "worker", "edge", "--help"]
