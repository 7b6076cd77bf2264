# One image for every role: the command picks `api`, `worker` or `migrate` (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    BNLAB_DATA_DIR=/data

WORKDIR /app

# Debian's package puts the full Fashion-MNIST in /usr/share/datasets/fashion-mnist, where bnlab looks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

# The same install as `make install` (pip from pyproject.toml, torch pinned there), minus the dev
# extras. The extra index serves the CPU build of that pinned torch, so no CUDA packages come along.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN python -m pip install --extra-index-url "${TORCH_INDEX_URL}" .

RUN useradd --create-home --uid 10001 bnlab && mkdir -p /data && chown bnlab /data
USER bnlab

EXPOSE 8000
ENTRYPOINT ["bnlab"]
CMD ["api"]
