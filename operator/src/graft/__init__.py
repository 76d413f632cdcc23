"""Graft: make and run domain-specific LLMs on Kubernetes."""

__version__ = "0.1.0"
