"""The operator's work for each TileJob: provision, run its pool, complete, delete, sweep orphans.

handlers.py calls these; runtime.py drives the pool; adapters.py talks to AWS and the proxies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

import kopf
from kubernetes import client, config as kube_config
from kubernetes.client.rest import ApiException

from tilehopper import contracts
from tilehopper.contracts import ProxyAnnouncement, ProxyState
from tilehopper_generator.spec import SpecError, count_tiles, iter_tiles, parse_spec
from tilehopper_operator import adapters, pool, workloads
from tilehopper_operator.config import OperatorConfig
from tilehopper_operator.progress import RabbitApi
from tilehopper_operator.runtime import JobRuntime, Progress
from tilehopper_operator.spec import JobSpec
from tilehopper_operator.workloads import JobRef, Kube

log = logging.getLogger(__name__)


def load_kube_config() -> None:
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()


class Operator:
    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        load_kube_config()
        self.kube = Kube()
        self.custom = client.CustomObjectsApi()
        self.rabbit = RabbitApi(config.rabbitmq_api_url)
        self.runtimes: dict[str, JobRuntime] = {}  # by job uid
        self.namespaces = {ns.strip() for ns in config.namespace_scope.split(",") if ns.strip()}
        self._last_status: dict[str, str] = {}

    # -- helpers -------------------------------------------------------------------------------

    def _job(self, body: kopf.Body) -> JobRef:
        return JobRef(namespace=body.metadata.namespace, name=body.metadata.name, uid=body.metadata.uid)

    def _spec(self, body: kopf.Body) -> JobSpec:
        return JobSpec.from_body(
            dict(body.spec),
            default_region=self.config.default_region,
            default_mode=self.config.address_mode,
            default_subnet=self.config.subnet_id,
        )

    async def _write_status(self, job: JobRef, fields: dict[str, Any]) -> None:
        """Merge-patch the TileJob's status; identical writes are skipped."""
        slot, value = f"{job.uid}:{sorted(fields)}", json.dumps(fields, sort_keys=True, default=str)
        if self._last_status.get(slot) == value:
            return
        self._last_status[slot] = value
        try:
            await asyncio.to_thread(
                self.custom.patch_namespaced_custom_object_status,
                contracts.API_GROUP, contracts.API_VERSION, job.namespace, contracts.TILEJOB_PLURAL,
                job.name, {"status": fields},
            )
        except ApiException as exc:
            if exc.status != 404:  # the job is gone: nothing left to report to
                raise

    # -- create / resume -----------------------------------------------------------------------

    async def provision(self, body: kopf.Body, patch: kopf.Patch) -> None:
        job, spec = self._job(body), self._spec(body)
        if (body.status or {}).get("phase") in ("Completed", "Failed"):
            return
        try:
            total = count_tiles(parse_spec(spec.tiles))
        except SpecError as exc:
            patch.status["phase"] = "Failed"
            kopf.event(body, type="Warning", reason="BadSpec", message=str(exc))
            raise kopf.PermanentError(f"spec.tiles: {exc}") from None
        owner = dict(body)
        existing = await asyncio.to_thread(self.kube.read_credentials, job)
        username, password = existing or (f"th{secrets.token_hex(6)}", secrets.token_urlsafe(24))
        paused = ProxyAnnouncement("", 0, "", ProxyState.PAUSED, spec.proxy.ban_status_codes)
        objects = [
            ("Secret", workloads.credentials_secret(job, username, password)),
            ("Secret", workloads.amqp_secret(job, self.config.amqp_url)),
            ("ConfigMap", workloads.proxy_configmap(job, paused)),
            ("ConfigMap", workloads.ban_configmap(job)),
            ("ServiceAccount", workloads.consumer_service_account(job)),
            ("Role", workloads.consumer_role(job)),
            ("RoleBinding", workloads.consumer_role_binding(job)),
            ("Job", workloads.generator_job(job, spec, self.config)),
            ("Deployment", workloads.consumer_deployment(job, spec, self.config, spec.replicas)),
        ]
        for kind, obj in objects:
            await asyncio.to_thread(self.kube.ensure, kind, obj, owner)
        patch.status["total"] = total
        if not (body.status or {}).get("phase"):
            patch.status["phase"] = "Provisioning"

    # -- the pool ------------------------------------------------------------------------------

    async def run_pool(self, body: kopf.Body, stopped: kopf.DaemonStopped) -> None:
        status = dict(body.status or {})
        if status.get("phase") in ("Completed", "Failed") or body.metadata.deletion_timestamp:
            return
        job, spec = self._job(body), self._spec(body)
        credentials = None
        while credentials is None and not stopped:
            credentials = await asyncio.to_thread(self.kube.read_credentials, job)
            if credentials is None:
                await asyncio.sleep(0.5)  # provision() has not written the Secret yet
        if credentials is None:
            return
        tiles = parse_spec(spec.tiles)
        total = count_tiles(tiles)
        probe_tile = next(iter_tiles(tiles))
        try:
            proxies = await adapters.Ec2Proxies.create(job, spec, self.config, credentials, probe_tile)
        except adapters.PermanentAwsError as exc:
            kopf.event(body, type="Warning", reason="AwsFailed", message=str(exc))
            await self._fail(job, body, str(exc))
            return

        async def read_progress() -> Progress:
            return await asyncio.to_thread(self._progress, job, total)

        pool_config = pool.PoolConfig(
            rotate_every=spec.proxy.rotate_every_s,
            standby=spec.proxy.standby,
            drain_seconds=self.config.drain_seconds,
            health_timeout=self.config.health_timeout_seconds,
            check_interval=1.0,
            proxy_port=spec.proxy.port,
        )
        runtime = JobRuntime(
            job=job, body=body, spec=spec, config=self.config, kube=self.kube, proxies=proxies,
            pool_config=pool_config, read_progress=read_progress,
            write_status=lambda fields: self._write_status(job, fields),
            state=pool.PoolState.from_dict(status.get("pool")),
        )
        self.runtimes[job.uid] = runtime
        try:
            await runtime.run(stopped)
        finally:
            self.runtimes.pop(job.uid, None)
        if runtime.state.failed:
            await proxies.sweep()
            await self._fail(job, body, runtime.state.failed)
        elif runtime.completed:
            report = await proxies.sweep()
            kopf.event(body, type="Normal", reason="Completed", message=f"AWS cleaned up: {report}")

    def _progress(self, job: JobRef, total: int) -> Progress:
        queue, dead = self.rabbit.job_counts(job.queue)
        generator = self.kube.generator_state(job)
        remaining = queue.total if queue else 0
        failed = dead.total if dead else 0
        # Until the generator has succeeded, what is not in the queues may not be published yet.
        done = max(0, total - remaining - failed) if generator == "succeeded" else 0
        return Progress(total=total, done=done, failed=failed, remaining=remaining, generator=generator)

    async def _fail(self, job: JobRef, body: kopf.Body, reason: str) -> None:
        await asyncio.to_thread(self.kube.scale_consumers, job, 0)
        await self._write_status(job, {"phase": "Failed", "conditions": [
            {"type": "Ready", "status": "False", "reason": "Failed", "message": reason[:500]},
            {"type": "Degraded", "status": "True", "reason": "Failed", "message": reason[:500]},
        ]})

    def wake(self, namespace: str, name: str) -> None:
        for runtime in self.runtimes.values():
            if runtime.job.namespace == namespace and runtime.job.name == name:
                runtime.notify_ban()

    # -- delete --------------------------------------------------------------------------------

    async def delete(self, body: kopf.Body) -> None:
        job, spec = self._job(body), self._spec(body)
        await self._write_status(job, {"phase": "Deleting"})
        runtime = self.runtimes.get(job.uid)
        if runtime is not None:
            await runtime.halt()  # no launch may land after the sweep
        report = await adapters.sweep_job(job, spec, self.config)
        if report.get("remaining"):
            raise kopf.TemporaryError(f"AWS resources still there: {report['remaining']}", delay=5)
        kopf.event(body, type="Normal", reason="CleanedUp", message=f"AWS resources removed: {report}")
        for queue in (job.queue, *adapters.extra_queues(job.queue)):
            try:
                await asyncio.to_thread(self.rabbit.delete_queue, queue)
            except Exception as exc:  # noqa: BLE001 - the broker's queues are not billed; AWS is
                log.warning("could not delete queue %s: %s", queue, exc)

    # -- orphans -------------------------------------------------------------------------------

    async def sweep_orphans_forever(self) -> None:
        while True:
            try:
                await self.sweep_orphans()
            except Exception:  # noqa: BLE001 - try again at the next period
                log.exception("orphan sweep failed")
            await asyncio.sleep(self.config.orphan_sweep_seconds)

    async def sweep_orphans(self) -> list[str]:
        """Sweep AWS resources whose TileJob is gone, among the namespaces this operator watches."""
        # AWS first, then Kubernetes: a job created in between is in the second list, so it is
        # never mistaken for an orphan.
        owned = await adapters.owned_jobs(self.config)
        scope = self.namespaces
        if scope:
            owned = {uid: ref for uid, ref in owned.items() if ref.split("/", 1)[0] in scope}
        if not owned:
            return []
        alive: set[str] = set()
        for namespace in sorted({ref.split("/", 1)[0] for ref in owned.values()}):
            listing = await asyncio.to_thread(
                self.custom.list_namespaced_custom_object,
                contracts.API_GROUP, contracts.API_VERSION, namespace, contracts.TILEJOB_PLURAL,
            )
            alive |= {item["metadata"]["uid"] for item in listing.get("items", [])}
        orphans = sorted(set(owned) - alive)
        for uid in orphans:
            t0 = time.monotonic()
            report = await adapters.sweep_uid(uid, self.config.default_region, self.config)
            log.warning("swept resources of vanished job %s (%s) in %.1fs: %s",
                        owned[uid], uid, time.monotonic() - t0, report)
        return orphans
