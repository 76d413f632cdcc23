"""Workload runtimes; installed with extras (graft[train], graft[serve]), never imported by the operator."""
