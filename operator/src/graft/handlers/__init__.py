"""Kopf handlers; importing this package registers them. Only these modules use Kopf decorators."""

from graft.handlers import finetunejob, modelservice, startup

__all__ = ["finetunejob", "modelservice", "startup"]
