# One image for every role: the command picks `api`, `worker` or `migrate` (see docker-compose.yml).
#
# The base is a build argument: the public python:3.11-slim by default; any Debian-like image with
# Python 3.11, its venv module and apt works (tests/deploy builds it on a debootstrapped Debian).
# One stage: everything installed ends up in the image anyway (no compilers, no wheels built here),
# so a second stage would save nothing (docs/deployment.md has the measured sizes).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/bnlab/bin:$PATH \
    BNLAB_DATA_DIR=/data

# Debian's package puts the full Fashion-MNIST in /usr/share/datasets/fashion-mnist, where bnlab looks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/dataset-fashion-mnist

# The same install as `make install` (pip from pyproject.toml, torch pinned there), minus the dev
# extras, into a virtual environment of its own (Debian's own Python refuses system-wide pip installs).
# The extra index serves the CPU build of that pinned torch, so no CUDA packages come along; set it
# empty where pip's own configuration already finds that wheel. The dependencies come first, in a
# layer of their own, so that a change to bnlab's code does not reinstall torch. Nothing at run time
# uses torch's C++ headers (no compiler here) or the C++ test programs some torch wheels carry: they
# go in the same layer (about 190 MB; torch_shm_manager stays).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/bnlab \
    && python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' > /tmp/requirements.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && cd /opt/bnlab/lib/python3*/site-packages/torch \
    && rm -rf include test bin/*[Tt]est* bin/test_* bin/protoc*
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-deps . && rm -rf build *.egg-info

RUN useradd --create-home --uid 10001 bnlab && mkdir -p /data && chown bnlab /data
USER bnlab
WORKDIR /home/bnlab

EXPOSE 8000
# The API's readiness: its database and its broker answer. The worker and migrate roles override or
# disable it (docker-compose.yml); BNLAB_PORT is honoured when set.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=5 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('BNLAB_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["bnlab"]
CMD ["api"]
