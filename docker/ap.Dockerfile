# Access point, model-zoo builder and load generator: the `ap` extra (the
# learner uses torch) plus the `zoo` extra that trains, exports and profiles
# the variants (`apdispatch models build --out /models`, the compose file's
# one-shot `models` service, which fills the volume the workers mount), and
# the `edge` extra: the zoo build profiles its ONNX variants with ONNX Runtime.
# The AP's torch runs on CPU, so the CPU wheel index is the default.
# Build context: the repository root (see .dockerignore).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c constraints.txt ".[ap,zoo,edge]"

EXPOSE 50051
CMD ["apdispatch", "serve", "--listen", "0.0.0.0:50051"]
