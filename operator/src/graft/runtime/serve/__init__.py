"""The serving runtime: an OpenAI-compatible Ray Serve application over a pluggable engine.

Installed with ``graft[serve]`` in the server image; the operator never imports it. The
Serve entry point is ``graft.runtime.serve.app:build_app`` (see docs/runtime-contract.md).
"""
