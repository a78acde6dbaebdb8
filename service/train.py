"""`python -m service.train SPEC`: the entrypoint for `ray job submit` and KubeRay RayJobs.

The same command as `progan train`; inside a Ray job, RAY_ADDRESS points Ray at the cluster.
"""

import sys

from service.cli import app


def main() -> None:
    app(["train", *sys.argv[1:]], prog_name="python -m service.train")


if __name__ == "__main__":
    main()
