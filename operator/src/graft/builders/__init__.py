"""Pure builders: typed custom resources and settings in, Kubernetes objects (dicts) out.

Nothing here does I/O, reads the clock or draws random numbers, so the same inputs always
give the same children and the reconcilers can compare ``graft.dev/spec-hash`` annotations
instead of live objects. Owner references are added by the caller (``kopf.adopt``).
"""
