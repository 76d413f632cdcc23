"""Workload runtimes, installed with extras (graft[train], graft[serve]).

The operator process never imports them.
"""
