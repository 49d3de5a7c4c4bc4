# Edge worker: the core plus ONNX Runtime, nothing else. An edge device has
# no room for torch, so this image must never pull it in (tests/test_compose.py
# checks the install line and the `edge` extra).
# Build context: the repository root (see .dockerignore).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install -c constraints.txt ".[edge]" \
    && ! pip show torch >/dev/null 2>&1

# Models come from the `models` volume, mounted read-only at /models.
EXPOSE 8001
CMD ["apdispatch", "worker", "edge", "--help"]
