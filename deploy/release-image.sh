#!/usr/bin/env bash
# Build a release image with its base image pinned by digest: the digest the base's tag names today is looked up
# once and written into the build (Dockerfile ARG GPU_BASE_DIGEST / CPU_BASE_DIGEST), so that rebuilding the
# release later, or a moved tag upstream, cannot change what it is built on. Needs a Docker daemon.
#
#   deploy/release-image.sh REGISTRY/progan-service:0.1.0            the CUDA image
#   deploy/release-image.sh REGISTRY/progan-service:0.1.0-cpu cpu    the CPU-only one
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: $0 IMAGE:TAG [gpu|cpu]}
variant=${2:-gpu}
ray_version=$(sed -n 's/^ARG RAY_VERSION=//p' Dockerfile)
case "${variant}" in
  gpu) base="rayproject/ray:${ray_version}-py311-cu128"; arg=GPU_BASE_DIGEST ;;
  cpu) base="rayproject/ray:${ray_version}-py311-cpu"; arg=CPU_BASE_DIGEST ;;
  *) echo "error: the variant is gpu or cpu, not ${variant}" >&2; exit 2 ;;
esac
docker pull --quiet "${base}" >/dev/null
repo_digest=$(docker image inspect --format '{{index .RepoDigests 0}}' "${base}")
digest="@${repo_digest#*@}"
echo "base: ${base}${digest}"
DOCKER_BUILDKIT=1 docker build --build-arg VARIANT="${variant}" --build-arg "${arg}=${digest}" \
  --label "org.opencontainers.image.base.name=${base}${digest}" -t "${image}" .
