"""`python -m deployments.serve [--root DIR] [--cohort COHORT] [--only FLOW/NAME ...]`.

Serves the deployments of deployments/prefect.yaml with ``prefect.serve`` (no work pool or
worker needed); the same as `brainrank serve`. The definitions live in flows/serve.py.
"""

from flows.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
