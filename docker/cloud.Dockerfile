# Cloud worker: the core plus PyTorch, for the large variants with batching,
# and ONNX Runtime, since a cloud worker serves ONNX variants too.
# PyPI's Linux torch wheel is the CUDA build, what a GPU host wants; pass
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a
# CPU-only image a few GB smaller.
# Build context: the repository root (see .dockerignore).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c constraints.txt ".[cloud,edge]"

# Models come from the `models` volume, mounted read-only at /models.
EXPOSE 8001
CMD ["apdispatch", "worker", "cloud", "--help"]
