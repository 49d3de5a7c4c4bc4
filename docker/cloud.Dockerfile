# Cloud worker: the core plus PyTorch, for the large variants with batching,
# and ONNX Runtime, since a cloud worker serves ONNX variants too.
# torch is the CPU build unless told otherwise: TORCH_INDEX_URL (a wheel
# index) or TORCH_FIND_LINKS (a folder or URL of wheels) offer it; an empty
# TORCH_INDEX_URL and no TORCH_FIND_LINKS take PyPI's (CUDA) build, what a GPU
# host wants. Build context: the repository root (see .dockerignore).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ARG TORCH_FIND_LINKS=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/venv/bin:$PATH

# The build host's extra CAs (docker/ca/*.crt) and a virtual environment, as
# in edge.Dockerfile.
COPY docker/ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml constraints.txt /app/
RUN touch README.md && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} \
        -c constraints.txt ".[cloud,edge]"
COPY . /app
RUN pip install --no-deps -c constraints.txt .

# Models come from the `models` volume, mounted read-only at /models.
EXPOSE 8001
CMD ["apdispatch", "worker", "cloud", "--help"]
