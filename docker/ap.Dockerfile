# Access point, model-zoo builder, certificate maker and load generator: the
# `ap` extra (the learner uses torch, `apdispatch certs` cryptography) plus
# the `zoo` extra that trains, exports and profiles the variants (`apdispatch
# models build --out /models`, the compose file's one-shot `models` service,
# which fills the volume the workers mount), and the `edge` extra: the zoo
# build profiles its ONNX variants with ONNX Runtime.
# torch is the CPU build: TORCH_INDEX_URL and TORCH_FIND_LINKS as in
# cloud.Dockerfile. Build context: the repository root (see .dockerignore).
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

# A C compiler and Python's headers: `apdispatch compile` builds the routing
# decision's hot path as C extensions (mypyc, the `compile` extra).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt /app/
RUN touch README.md && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} \
        -c constraints.txt ".[ap,zoo,edge,compile]"
COPY . /app
RUN pip install --no-deps -c constraints.txt . && apdispatch compile

EXPOSE 50051
CMD ["apdispatch", "serve", "--listen", "0.0.0.0:50051"]
