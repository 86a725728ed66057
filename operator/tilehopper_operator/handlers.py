"""The one module that registers handlers with kopf. Each handler guards and delegates."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from tilehopper import contracts
from tilehopper_operator import jobs
from tilehopper_operator.config import OperatorConfig

GROUP, VERSION, PLURAL = contracts.API_GROUP, contracts.API_VERSION, contracts.TILEJOB_PLURAL
FINALIZER = f"{contracts.API_GROUP}/aws-cleanup"

log = logging.getLogger(__name__)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = OperatorConfig.from_env()
    logging.getLogger().setLevel(config.log_level.upper())
    # Our own finalizer and annotation prefix, not kopf's defaults (crate-operator does the same).
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=contracts.API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=contracts.API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's are noise
    settings.peering.standalone = True  # one replica; no peering CRD to install
    settings.watching.server_timeout = 300
    memo.operator = jobs.Operator(config)
    memo.sweeper = asyncio.create_task(memo.operator.sweep_orphans_forever())


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    memo.sweeper.cancel()


@kopf.on.create(GROUP, VERSION, PLURAL)
async def created(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    await memo.operator.provision(body, patch)


@kopf.on.resume(GROUP, VERSION, PLURAL)
async def resumed(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    await memo.operator.provision(body, patch)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=150, initial_delay=0.5)
async def pool_daemon(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    await memo.operator.run_pool(body, stopped)


@kopf.on.event("", "v1", "configmaps", labels={contracts.LABEL_ROLE: "ban-report"})
async def ban_reported(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # The ban report is a fact in the ConfigMap; this only wakes the job's pool so it acts at once.
    memo.operator.wake(body.metadata.namespace, body.metadata.labels.get(contracts.LABEL_JOB, ""))


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.operator.delete(body)
