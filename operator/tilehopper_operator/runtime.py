"""One TileJob's driver: feeds the pool machine and carries out what it asks for.

The machine (pool.py) decides; this module only translates. Each action runs as a task whose result
comes back as an event, so a ban report is handled at once even while a launch is still in flight.
The machine's state is written to the TileJob's status before any action runs, so an operator
killed at any moment resumes from it and repeats every action in flight (each is safe to repeat:
launches are found again by their slot tag).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from tilehopper import contracts
from tilehopper.contracts import ProxyAnnouncement
from tilehopper_operator import pool, status as job_status
from tilehopper_operator.config import OperatorConfig
from tilehopper_operator.spec import JobSpec
from tilehopper_operator.workloads import JobRef, Kube

log = logging.getLogger(__name__)

# How often a job's instances are described to notice terminations (ours, and the dead-man's).
INSTANCE_CHECK_SECONDS = 3.0


class ProxyPort:
    """What the driver needs from AWS and the health check (adapters.py binds the real ones)."""

    async def launch(self, slot: str, generation: int) -> tuple[str, str]: ...  # (instance id, address)
    async def terminate(self, instance_id: str) -> None: ...
    async def states(self) -> dict[str, str]: ...  # instance id -> EC2 state, of this job's instances
    async def check(self, instance_id: str, address: str) -> tuple[bool, str, str]: ...  # ok, detail, address


class PermanentLaunchError(Exception):
    """Bad credentials, bad image: the job cannot run."""


@dataclass
class Progress:
    total: int = 0
    done: int = 0
    failed: int = 0
    remaining: int = 0
    generator: str = "absent"
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=60))

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return max(0.0, (d1 - d0) / (t1 - t0)) if t1 > t0 else 0.0


class JobRuntime:
    def __init__(
        self,
        *,
        job: JobRef,
        body: kopf.Body,
        spec: JobSpec,
        config: OperatorConfig,
        kube: Kube,
        proxies: ProxyPort,
        pool_config: pool.PoolConfig,
        read_progress: Callable[[], Awaitable[Progress]],
        write_status: Callable[[dict[str, Any]], Awaitable[None]],
        state: pool.PoolState,
    ) -> None:
        self.job = job
        self.body = body
        self.spec = spec
        self.config = config
        self.kube = kube
        self.proxies = proxies
        self.pool_config = pool_config
        self.read_progress = read_progress
        self.write_status = write_status
        self.state = state
        self.events: asyncio.Queue[pool.Event] = asyncio.Queue()
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.progress = Progress()
        self.completed = False
        self.halted = False  # the job is being deleted: act no more, the finalizer sweeps
        self._last_progress_at = 0.0
        self._last_instances_at = 0.0
        self._last_published: ProxyAnnouncement | None = None

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, stopped: kopf.DaemonStopped) -> None:
        now = time.time()
        await self._feed(pool.Resume(now) if self.state.instances else pool.Tick(now))
        while not stopped and not self.completed and not self.halted:
            await self._check_bans()
            await self._check_instances()
            await self._update_progress()
            await self._drain_events()
            if self.state.finished and (self.completed or self.state.failed):
                break  # done, or failed for good with every instance terminated
            await self._sleep()
        await self.close()

    async def stop_pool(self) -> None:
        """Stop event: terminate every instance (work finished or job deleted)."""
        await self._feed(pool.Stop(time.time()))

    async def halt(self) -> None:
        """Stop acting (the TileJob is being deleted) and let every call in flight finish."""
        self.halted = True
        self.wake.set()
        await self.close()

    async def close(self) -> None:
        """Let every in-flight AWS call finish: nothing may be created after the job's sweep."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=120)

    def notify_ban(self) -> None:
        self.wake.set()

    async def _sleep(self) -> None:
        wakeup = pool.next_wakeup(self.state, self.pool_config)
        delay = self.config.tick_seconds
        if wakeup is not None:
            delay = min(delay, max(0.0, wakeup - time.time()))
        if not self.events.empty():
            return
        self.wake.clear()
        getter = asyncio.ensure_future(self.events.get())
        waker = asyncio.ensure_future(self.wake.wait())
        done, pending = await asyncio.wait({getter, waker}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if getter in done:
            await self._feed(getter.result())
        await self._feed(pool.Tick(time.time()))

    async def _drain_events(self) -> None:
        while not self.events.empty():
            await self._feed(self.events.get_nowait())

    async def _feed(self, event: pool.Event) -> None:
        self.state, actions = pool.step(self.state, event, self.pool_config)
        await self.write_status({"pool": self.state.to_dict(), **self._pool_status()})
        for action in actions:
            await self._act(action)

    # -- actions -------------------------------------------------------------------------------

    async def _act(self, action: pool.Action) -> None:
        if self.halted:
            return
        if isinstance(action, pool.Publish):
            await self._publish(action)
        elif isinstance(action, pool.Launch):
            self._spawn(self._launch(action))
        elif isinstance(action, pool.CheckHealth):
            self._spawn(self._check(action))
        elif isinstance(action, pool.Terminate):
            self._spawn(self._terminate(action))
        else:
            self._record(action)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _publish(self, action: pool.Publish) -> None:
        announcement = ProxyAnnouncement(
            url=action.url,
            generation=action.generation,
            instance_id=action.instance_id,
            state=action.state,
            ban_status_codes=self.spec.proxy.ban_status_codes,
        )
        await asyncio.to_thread(self.kube.publish_proxy, self.job, announcement)
        self._last_published = announcement
        log.info("published generation %d: %s %s", action.generation, action.state, action.url or "-")

    async def _launch(self, action: pool.Launch) -> None:
        try:
            instance_id, address = await self.proxies.launch(action.slot, action.generation)
        except PermanentLaunchError as exc:
            self._event("Warning", "AwsFailed", f"launch of {action.slot} failed for good: {exc}")
            await self.events.put(pool.LaunchFailed(action.slot, str(exc), True, time.time()))
        except Exception as exc:  # noqa: BLE001 - transient after botocore's own retries
            self._event("Warning", "AwsFailed", f"launch of {action.slot} failed: {exc}")
            await self.events.put(pool.LaunchFailed(action.slot, str(exc), False, time.time()))
        else:
            self._event("Normal", "Launched", f"{action.slot}: instance {instance_id} at {address or '?'}")
            await self.events.put(pool.LaunchFinished(action.slot, instance_id, address, time.time()))
        self.wake.set()

    async def _check(self, action: pool.CheckHealth) -> None:
        try:
            ok, detail, address = await self.proxies.check(action.instance_id, action.address)
        except Exception as exc:  # noqa: BLE001 - a failed check is a result, not a crash
            ok, detail, address = False, str(exc), action.address
        now = time.time()
        if ok:
            await self.events.put(pool.InstanceHealthy(action.slot, now, address=address))
        else:
            await self.events.put(pool.InstanceUnhealthy(action.slot, now, detail=detail))
        self.wake.set()

    async def _terminate(self, action: pool.Terminate) -> None:
        try:
            await self.proxies.terminate(action.instance_id)
        except Exception as exc:  # noqa: BLE001 - asked again by the machine after terminate_retry
            self._event("Warning", "AwsFailed", f"terminate {action.instance_id}: {exc}")
            return
        log.info("terminating %s (%s)", action.instance_id, action.reason)

    def _record(self, action: pool.Action) -> None:
        if isinstance(action, pool.RotationHappened):
            self._event(
                "Normal",
                "Rotated",
                f"{action.reason}: generation {action.from_generation} -> {action.to_generation}, "
                f"{action.from_instance or '-'} -> {action.to_instance}",
            )
        elif isinstance(action, pool.Banned):
            self._event("Warning", "Banned", f"generation {action.generation} ({action.instance_id}) was banned; {action.outcome}")
        elif isinstance(action, pool.Paused):
            self._event("Warning", "Paused", f"no healthy proxy: consumers wait ({action.reason})")
        elif isinstance(action, pool.InstanceReplaced):
            self._event("Warning", "Replaced", f"{action.instance_id or action.slot}: {action.reason}")
        elif isinstance(action, pool.PoolFailed):
            self._event("Warning", "Failed", action.reason)

    def _event(self, type_: str, reason: str, message: str) -> None:
        log.info("%s: %s", reason, message)
        try:
            kopf.event(self.body, type=type_, reason=reason, message=message[:1000])
        except Exception:  # noqa: BLE001 - an event is a record; its loss must not stop the pool
            log.exception("could not post event %s", reason)

    # -- inputs --------------------------------------------------------------------------------

    async def _check_bans(self) -> None:
        data = await asyncio.to_thread(self.kube.read_bans, self.job)
        generations = contracts.banned_generations(data)
        if self.state.generation in generations and self.state.banned_generation < self.state.generation:
            await self._feed(pool.BanReported(self.state.generation, time.time()))
        stale = [contracts.ban_key(g) for g in generations if g < self.state.generation - 1]
        if stale:
            await asyncio.to_thread(self.kube.prune_bans, self.job, stale)

    async def _check_instances(self) -> None:
        watched = [i for i in self.state.instances if i.instance_id and i.phase != "terminated"]
        # DescribeInstances at most every few seconds per job: EC2 throttles an account's calls.
        now = time.monotonic()
        if not watched or now - self._last_instances_at < INSTANCE_CHECK_SECONDS:
            return
        self._last_instances_at = now
        states = await self.proxies.states()
        for inst in watched:
            if states.get(inst.instance_id, "gone") in ("terminated", "shutting-down", "stopped", "stopping", "gone"):
                await self._feed(pool.InstanceGone(inst.instance_id, time.time()))

    async def _update_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress_at < 1.0:
            return
        self._last_progress_at = now
        try:
            fresh = await self.read_progress()
        except Exception as exc:  # noqa: BLE001 - progress is advisory; try again next tick
            log.warning("progress unavailable: %s", exc)
            return
        fresh.samples = self.progress.samples  # the rate is measured across readings
        self.progress = fresh
        self.progress.samples.append((time.time(), self.progress.done))
        finished_work = self.progress.generator == "succeeded" and self.progress.remaining == 0
        if finished_work and not self.state.stopped:
            await asyncio.to_thread(self.kube.scale_consumers, self.job, 0)
            self._event("Normal", "WorkDone", f"{self.progress.done} tiles done, {self.progress.failed} failed")
            await self.stop_pool()
        if self.state.finished:
            self.completed = True
        await self.write_status(job_status.progress_fields(self.progress, self.state, self.completed))

    def _pool_status(self) -> dict[str, Any]:
        return job_status.pool_fields(self.state, self.pool_config)
