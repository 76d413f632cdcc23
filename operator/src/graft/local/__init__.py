"""The local backend: ``graft run``, ``graft serve`` and ``graft plan`` without Kubernetes.

The same custom-resource YAML that the operator reconciles runs here on one machine:
FineTuneJobs through the trainer runtime's local launcher (processes instead of a gang of
pods), ModelServices on a local Ray Serve with the serve config the operator would render.
See docs/local.md. Nothing here imports torch or ray at module import time.
"""
