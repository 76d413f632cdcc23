# A Ray base for machines that cannot pull rayproject/ray: the Python base, the pinned
# ray[serve], and the layout images/server/Dockerfile expects from rayproject/ray: a
# non-root user "ray" (uid 1000, gid 100) that owns the Python environment on PATH.
# hack/build-images.py builds it only when rayproject/ray:<version>-py311 cannot be pulled.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG RAY_VERSION=2.60.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PATH=/home/ray/venv/bin:$PATH \
    HOME=/home/ray
RUN (getent group 100 >/dev/null || groupadd --gid 100 users) \
 && useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
USER 1000:100
RUN --mount=type=secret,id=pip.conf,uid=1000 --mount=type=secret,id=pip-ca,uid=1000 \
    --mount=type=secret,id=pip-constraints,uid=1000 \
    python -m venv /home/ray/venv \
 && PIP_CONFIG_FILE=/run/secrets/pip.conf pip install "ray[serve]==${RAY_VERSION}" \
 && python -c "import ray, ray.serve; assert ray.__version__ == '${RAY_VERSION}'"
WORKDIR /home/ray
