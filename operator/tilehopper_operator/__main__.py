"""`tilehopper-operator`: run the kopf operator (in its pod, or on a laptop against a kubeconfig)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import kopf

from tilehopper_operator.config import OperatorConfig


def _accept_original_credentials() -> None:
    # The original task named its keys AWS_SERVER_PUBLIC_KEY / AWS_SERVER_SECRET_KEY.
    for original, standard in (("AWS_SERVER_PUBLIC_KEY", "AWS_ACCESS_KEY_ID"),
                               ("AWS_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")):
        if os.environ.get(original) and not os.environ.get(standard):
            os.environ[standard] = os.environ[original]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilehopper-operator", description=__doc__)
    parser.add_argument("--namespace", action="append", default=None,
                        help="watch only this namespace (repeatable); default: TILEHOPPER_NAMESPACE_SCOPE or all")
    parser.add_argument("--liveness", default="", help="e.g. http://0.0.0.0:8080/healthz")
    args = parser.parse_args(argv)
    config = OperatorConfig.from_env()
    _accept_original_credentials()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import tilehopper_operator.handlers  # noqa: F401 - registers the handlers

    scope = [ns.strip() for ns in config.namespace_scope.split(",") if ns.strip()]
    namespaces = args.namespace or scope or None
    asyncio.run(kopf.operator(
        standalone=True,
        clusterwide=namespaces is None,
        namespaces=namespaces or [],
        liveness_endpoint=args.liveness or None,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
