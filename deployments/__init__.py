"""Deployment files of brainrank (not an installed package): prefect.yaml, configs/, ray/.

``python -m deployments.serve`` (from the repository root) serves the Prefect deployments;
the code lives in the installed package (flows.serve), so `brainrank serve` works anywhere.
"""
