"""``graft-operator``: run the Kopf operator (all namespaces unless told otherwise)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import kopf

from graft import logs, metrics
from graft.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="graft-operator",
        description="Reconcile FineTuneJobs and ModelServices. Settings come from GRAFT_* "
        "environment variables and the GRAFT_CONFIG file (see docs/operator.md).",
    )
    parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"graft-operator: {e}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    if settings.log_level.upper() != "DEBUG":
        # Kopf logs two INFO lines per handled object ("Handler ... succeeded", "... is
        # processed"): most of the log at 10,000 jobs (a restart resumes every one) and a
        # measurable share of the CPU per job. Graft's own log and Events say what a pass
        # did; warnings and errors still come through; DEBUG brings Kopf's lines back.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics.serve(settings.metrics_port)
    import graft.handlers  # noqa: F401  - registers the handlers

    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(
        kopf.operator(
            clusterwide=not settings.watch_namespaces,
            namespaces=settings.watch_namespaces,
            standalone=True,
            liveness_endpoint=liveness,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
