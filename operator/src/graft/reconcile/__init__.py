"""Reconcilers: read the world, call the pure builders, apply, return the new status."""
