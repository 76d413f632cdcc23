"""Typed API of graft.dev/v1alpha1: the models are the schema (CRDs are generated from them)."""
