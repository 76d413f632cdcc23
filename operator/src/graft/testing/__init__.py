"""Test support shipped with the package.

A real control plane, fake nodes, a fake kubelet, tiny models and corpora.
"""
