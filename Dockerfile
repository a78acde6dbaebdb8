# syntax=docker/dockerfile:1
# The image KubeRay runs for the head and the workers: Ray 2.60 on Python 3.11, torch, and this project.
#   docker build -t progan-service:0.1.0 .                                  CUDA 12.8 (the default)
#   docker build --build-arg VARIANT=cpu -t progan-service:0.1.0-cpu .      CPU only (k8s/overlays/cpu-smoke)
# Only the selected base stage is built (BuildKit). The dependency layers come before the source, so editing
# service/ or workers/ rebuilds only the last layer.
# A release pins the base image by digest, so that a moved tag cannot change what it ships (deploy/release-image.sh
# looks the digest up and passes it):
#   docker build --build-arg GPU_BASE_DIGEST=@sha256:<digest> -t progan-service:0.1.0 .
#   docker build --build-arg VARIANT=cpu --build-arg CPU_BASE_DIGEST=@sha256:<digest> -t progan-service:0.1.0-cpu .
ARG RAY_VERSION=2.60.0
ARG VARIANT=gpu
ARG GPU_BASE_DIGEST=
ARG CPU_BASE_DIGEST=

FROM rayproject/ray:${RAY_VERSION}-py311-cu128${GPU_BASE_DIGEST} AS base-gpu

FROM rayproject/ray:${RAY_VERSION}-py311-cpu${CPU_BASE_DIGEST} AS base-cpu

# base-${VARIANT} is one of the two tagged stages above.
# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0
# The default index serves the CUDA build of torch; for a slimmer CPU image pass the CPU wheel index of PyTorch.
ARG TORCH_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The `ray` user (uid 1000, group users) of the base image, by number so that runAsNonRoot can verify it.
# The project folder is made by that user (WORKDIR would make it root's): pip builds the package inside it.
USER 1000:100
RUN mkdir /home/ray/progan \
    && if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"
WORKDIR /home/ray/progan

# The project's dependencies, read from pyproject.toml alone (torch and ray are already satisfied).
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 service ./service
COPY --chown=1000:100 workers ./workers
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import service.train, workers"
