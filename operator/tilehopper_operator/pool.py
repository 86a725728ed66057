"""The proxy pool of one TileJob as a pure state machine (style.md: no AWS, no Kubernetes, no clock).

The user's algorithm (design.md): instance A is active and B stands by; after `rotate_every`, or
on a ban for the current generation, traffic switches to B at once (a new generation), A drains
briefly and is terminated, and C is booted to stand by; and so on.

The driver (a kopf timer or handler) feeds events into `step` and carries out the actions it
returns. Everything the machine knows is in `PoolState`, which round-trips through a plain dict,
so it can live in the TileJob's status and survive an operator crash:

    state = PoolState.from_dict(status.get("pool"))
    state, actions = step(state, Tick(now=time.time()), config)
    patch.status["pool"] = state.to_dict()      # persist first ...
    for action in actions: ...                  # ... then act; every action is safe to repeat

Launches are keyed by a slot ("proxy-7") taken from a counter in the state, so a launch repeated
after a crash finds the instance it already created by its slot tag instead of making another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from tilehopper.contracts import PROXY_PORT, ProxyState

# --- Configuration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How the pool behaves; all times are seconds."""

    rotate_every: float = 300.0  # switch to the standby after the active served this long
    standby: int = 1  # healthy instances kept ready besides the active one
    drain_seconds: float = 5.0  # the old active keeps serving in-flight requests this long
    health_timeout: float = 300.0  # a new instance not healthy this long after launch is replaced
    boot_grace: float = 0.0  # first health check this long after the launch finished
    check_interval: float = 5.0  # health checks of a booting instance, this far apart
    recheck_every: float = 30.0  # health checks of the ready standby and the active one
    check_answer_timeout: float = 60.0  # a check with no answer this long is asked again
    active_max_failures: int = 2  # consecutive failed checks before the active is rotated away
    launch_retry: float = 120.0  # a launch with no answer this long is asked again (same slot)
    terminate_retry: float = 60.0  # a termination not confirmed this long is asked again
    # Flapping: after this many consecutive failed instances, launches back off exponentially,
    # so a broken image or source does not burn money; the active instance is never touched.
    max_consecutive_failures: int = 3
    backoff_base: float = 15.0
    backoff_max: float = 600.0
    proxy_port: int = PROXY_PORT
    history: int = 20  # rotations kept in the state (rotations_total counts them all)
    keep_terminated: int = 5  # terminated instances kept in the state, for the record

    def __post_init__(self) -> None:
        if self.rotate_every <= 0:
            raise ValueError("rotate_every must be positive")
        if self.standby < 1:
            raise ValueError("standby must be at least 1: a ban must find an instance to switch to")

    @property
    def target(self) -> int:
        return 1 + self.standby


# --- State ----------------------------------------------------------------------------------

Phase = Literal[
    "launching",  # Launch asked for; no instance id yet
    "booting",  # the instance exists; no health check sent yet
    "checking",  # health checks sent, none succeeded yet
    "ready",  # healthy standby
    "active",  # the one the ConfigMap names
    "draining",  # was active; in-flight requests finish before it is terminated
    "terminating",  # Terminate asked for; not yet seen gone
    "terminated",
]
LIVE_PHASES: Final = ("launching", "booting", "checking", "ready", "active")
STARTING_PHASES: Final = ("launching", "booting", "checking")

Reason = Literal["timer", "ban", "unhealthy", "gone"]


@dataclass(slots=True)
class Instance:
    slot: str
    phase: Phase
    since: float  # when the instance entered its phase
    launched_at: float
    instance_id: str = ""
    address: str = ""
    generation: int = 0  # generation it served (active) or was launched in
    check_sent_at: float | None = None  # a health check is out and not answered
    last_check_at: float | None = None
    last_check_ok: bool = False
    failed_checks: int = 0  # consecutive
    banned: bool = False
    note: str = ""  # why it was terminated, for the record


@dataclass(frozen=True, slots=True)
class Rotation:
    reason: str
    from_instance: str
    to_instance: str
    from_generation: int
    to_generation: int
    at: float


@dataclass(slots=True)
class PoolState:
    instances: list[Instance] = field(default_factory=list)
    generation: int = 0  # grows at every switch; 0 = nothing published active yet
    active_slot: str = ""
    rotations: list[Rotation] = field(default_factory=list)  # the last `history` ones
    rotations_total: int = 0
    pending_reason: str = ""  # a rotation is owed and waits for a ready standby
    banned_generation: int = 0  # the last generation a ban was reported for
    last_active_instance: str = ""  # for the record of a rotation out of a pause
    next_slot: int = 1
    consecutive_failures: int = 0
    last_failure_at: float = 0.0
    launch_not_before: float = 0.0
    published: dict[str, Any] | None = None  # the last Publish, so it is emitted only on change
    stopped: bool = False
    failed: str = ""  # a permanent error ended the pool

    # -- queries the driver and the status use --

    @property
    def active(self) -> Instance | None:
        return self._by_slot(self.active_slot) if self.active_slot else None

    @property
    def paused(self) -> bool:
        return self.active is None

    @property
    def standbys(self) -> list[Instance]:
        return sorted((i for i in self.instances if i.phase == "ready"), key=lambda i: i.since)

    @property
    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.phase in LIVE_PHASES]

    @property
    def finished(self) -> bool:
        """Stopped and every instance it knows of is terminated."""
        return self.stopped and all(i.phase == "terminated" for i in self.instances)

    def find(self, ref: str) -> Instance | None:
        """An instance by slot or instance id."""
        for inst in self.instances:
            if ref and (inst.slot == ref or inst.instance_id == ref):
                return inst
        return None

    def _by_slot(self, slot: str) -> Instance | None:
        return next((i for i in self.instances if i.slot == slot), None)

    # -- serialisation (TileJob status / annotations) --

    def to_dict(self) -> dict[str, Any]:
        # By hand, not dataclasses.asdict: every step copies the state this way, and asdict's
        # deep copies cost milliseconds. Every field is a plain immutable value.
        out = {f: getattr(self, f) for f in _STATE_FIELDS}
        out["instances"] = [{f: getattr(i, f) for f in _INSTANCE_FIELDS} for i in self.instances]
        out["rotations"] = [{f: getattr(r, f) for f in _ROTATION_FIELDS} for r in self.rotations]
        out["published"] = dict(self.published) if self.published is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PoolState:
        if not data:
            return cls()
        data = dict(data)
        instances = [Instance(**i) for i in data.pop("instances", [])]
        rotations = [Rotation(**r) for r in data.pop("rotations", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            instances=instances,
            rotations=rotations,
            **{k: v for k, v in data.items() if k in known},
        )


_INSTANCE_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Instance))
_ROTATION_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Rotation))
_STATE_FIELDS: Final = tuple(f.name for f in dataclasses.fields(PoolState))


# --- Events (inputs) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: timeouts, due health checks, due rotations, missing instances."""

    now: float


@dataclass(frozen=True, slots=True)
class Resume:
    """The operator (re)started with a persisted state: repeat every action in flight."""

    now: float


@dataclass(frozen=True, slots=True)
class BanReported:
    generation: int
    now: float


@dataclass(frozen=True, slots=True)
class LaunchFinished:
    slot: str
    instance_id: str
    address: str  # may be empty (a public address comes later); the health check supplies it
    now: float


@dataclass(frozen=True, slots=True)
class LaunchFailed:
    slot: str
    reason: str
    permanent: bool  # bad credentials, bad image: the job cannot run
    now: float


@dataclass(frozen=True, slots=True)
class InstanceHealthy:
    instance: str  # slot or instance id
    now: float
    address: str = ""  # the address the check went through: the one that gets published


@dataclass(frozen=True, slots=True)
class InstanceUnhealthy:
    instance: str
    now: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class HealthTimeout:
    """The driver gave up on an instance's health (Tick finds the same by itself)."""

    instance: str
    now: float


@dataclass(frozen=True, slots=True)
class InstanceGone:
    """EC2 says the instance is terminated (or no longer exists)."""

    instance_id: str
    now: float


@dataclass(frozen=True, slots=True)
class Stop:
    """The work is finished or the TileJob is deleted: publish paused, terminate everything."""

    now: float


Event = (
    Tick
    | Resume
    | BanReported
    | LaunchFinished
    | LaunchFailed
    | InstanceHealthy
    | InstanceUnhealthy
    | HealthTimeout
    | InstanceGone
    | Stop
)

# --- Actions (outputs) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Launch:
    slot: str  # idempotency key: tag the instance with it and look it up before launching
    generation: int


@dataclass(frozen=True, slots=True)
class CheckHealth:
    slot: str
    instance_id: str
    address: str  # may be empty: resolve it from EC2 and report it back with InstanceHealthy


@dataclass(frozen=True, slots=True)
class Publish:
    """What the <job>-proxy ConfigMap must say (contracts.ProxyAnnouncement)."""

    url: str  # http://address:port, never credentials; empty when paused
    generation: int
    instance_id: str
    state: str  # contracts.ProxyState


@dataclass(frozen=True, slots=True)
class Terminate:
    instance_id: str
    reason: str


# Things to record (Kubernetes Events on the TileJob, logs, metrics); they change nothing.


@dataclass(frozen=True, slots=True)
class RotationHappened:
    reason: str
    from_instance: str
    to_instance: str
    from_generation: int
    to_generation: int
    at: float


@dataclass(frozen=True, slots=True)
class Banned:
    generation: int
    instance_id: str
    at: float
    outcome: str  # "switched" or "paused"


@dataclass(frozen=True, slots=True)
class Paused:
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class InstanceReplaced:
    instance_id: str
    slot: str
    reason: str
    at: float
    backoff_until: float  # 0 when the replacement launches at once


@dataclass(frozen=True, slots=True)
class PoolFailed:
    reason: str
    at: float


Action = (
    Launch
    | CheckHealth
    | Publish
    | Terminate
    | RotationHappened
    | Banned
    | Paused
    | InstanceReplaced
    | PoolFailed
)


def action_kind(action: Action) -> str:
    return type(action).__name__


# --- The machine ----------------------------------------------------------------------------


def step(state: PoolState, event: Event, config: PoolConfig) -> tuple[PoolState, list[Action]]:
    """Apply one event; returns the new state (the old one is untouched) and the actions to take."""
    machine = _Machine(PoolState.from_dict(state.to_dict()), config)
    machine.handle(event)
    return machine.state, machine.actions


def step_all(
    state: PoolState, events: Iterable[Event], config: PoolConfig
) -> tuple[PoolState, list[Action]]:
    """Apply events in order (a driver collects ban reports, check results and EC2's view, then
    steps once and persists once)."""
    actions: list[Action] = []
    for event in events:
        state, more = step(state, event, config)
        actions += more
    return state, actions


def next_wakeup(state: PoolState, config: PoolConfig) -> float | None:
    """The earliest time a Tick can change anything (None: nothing to wait for but events)."""
    times: list[float] = []
    for inst in state.instances:
        if inst.phase == "terminating":
            times.append(inst.since + config.terminate_retry)
        elif state.stopped or state.failed:
            continue
        elif inst.phase == "launching":
            times.append(inst.since + config.launch_retry)
        elif inst.phase == "draining":
            times.append(inst.since + config.drain_seconds)
        elif inst.phase in ("booting", "checking", "ready", "active"):
            times.append(_next_check_time(inst, config))
            if inst.phase in STARTING_PHASES:
                times.append(inst.launched_at + config.health_timeout)
    if not (state.stopped or state.failed):
        active = state.active
        if active is not None and not state.pending_reason:
            times.append(active.since + config.rotate_every)
        if len(state.live) < config.target:
            times.append(state.launch_not_before)
    return min(times, default=None)


def announcement(state: PoolState, config: PoolConfig) -> Publish:
    """What the ConfigMap must say now (the driver may re-publish it at any time)."""
    active = state.active
    if active is None or state.stopped:
        return Publish(url="", generation=state.generation, instance_id="", state=ProxyState.PAUSED)
    return Publish(
        url=f"http://{active.address}:{config.proxy_port}",
        generation=state.generation,
        instance_id=active.instance_id,
        state=ProxyState.ACTIVE,
    )


def _next_check_time(inst: Instance, config: PoolConfig) -> float:
    if inst.check_sent_at is not None:
        return inst.check_sent_at + config.check_answer_timeout
    if inst.last_check_at is None:
        return inst.since + config.boot_grace
    interval = config.check_interval if inst.phase in STARTING_PHASES else config.recheck_every
    return inst.last_check_at + interval


class _Machine:
    def __init__(self, state: PoolState, config: PoolConfig) -> None:
        self.state = state
        self.config = config
        self.actions: list[Action] = []

    # -- dispatch --

    def handle(self, event: Event) -> None:
        if isinstance(event, Stop):
            self.stop(event.now)
        elif isinstance(event, LaunchFinished):
            self.launch_finished(event)
        elif isinstance(event, InstanceGone):
            self.gone(event)
        elif isinstance(event, Resume):
            self.resume(event.now)
        elif self.state.stopped or self.state.failed:
            pass  # a stopped pool only finishes its terminations (below)
        elif isinstance(event, BanReported):
            self.ban(event)
        elif isinstance(event, LaunchFailed):
            self.launch_failed(event)
        elif isinstance(event, InstanceHealthy):
            self.healthy(event)
        elif isinstance(event, InstanceUnhealthy):
            self.unhealthy(event.instance, event.now, event.detail or "health check failed")
        elif isinstance(event, HealthTimeout):
            inst = self.state.find(event.instance)
            if inst is not None and inst.phase in STARTING_PHASES:
                self.replace(inst, event.now, "not healthy within the health timeout")
        self.tick(event.now)
        self.prune()

    # -- time --

    def tick(self, now: float) -> None:
        st, cfg = self.state, self.config
        if st.published is None and not st.stopped:
            self.publish()  # the ConfigMap exists (paused) from the very start
        for inst in list(st.instances):
            if inst.phase == "terminating" and now - inst.since >= cfg.terminate_retry:
                inst.since = now
                self.actions.append(Terminate(inst.instance_id, inst.note or "retry"))
        if st.stopped or st.failed:
            return
        for inst in list(st.instances):
            if inst.phase == "launching" and now - inst.since >= cfg.launch_retry:
                inst.since = now  # no answer: ask again, the slot makes it the same launch
                self.actions.append(Launch(inst.slot, inst.generation))
            elif inst.phase in STARTING_PHASES[1:] and now - inst.launched_at >= cfg.health_timeout:
                self.replace(inst, now, "not healthy within the health timeout")
            elif inst.phase == "draining" and now - inst.since >= cfg.drain_seconds:
                self.terminate(inst, now, "drained after rotation")
        for inst in st.instances:
            if inst.phase in ("booting", "checking", "ready", "active"):
                if now >= _next_check_time(inst, cfg):
                    self.check(inst, now)
        active = st.active
        if active is not None and not st.pending_reason and now - active.since >= cfg.rotate_every:
            st.pending_reason = "timer"
        self.try_switch(now)
        self.replenish(now)

    def resume(self, now: float) -> None:
        """Repeat every action in flight: each is idempotent, and its answer may be lost."""
        st = self.state
        for inst in st.instances:
            if inst.phase == "launching" and not st.stopped:
                inst.since = now
                self.actions.append(Launch(inst.slot, inst.generation))
            elif inst.phase == "terminating" and inst.instance_id:
                inst.since = now
                self.actions.append(Terminate(inst.instance_id, inst.note or "resume"))
            elif inst.check_sent_at is not None:
                inst.check_sent_at = None  # its answer died with the old process
        self.publish(force=True)

    # -- launches --

    def replenish(self, now: float) -> None:
        st = self.state
        while len(st.live) < self.config.target and now >= st.launch_not_before:
            slot = f"proxy-{st.next_slot}"
            st.next_slot += 1
            st.instances.append(
                Instance(slot=slot, phase="launching", since=now, launched_at=now, generation=st.generation)
            )
            self.actions.append(Launch(slot, st.generation))

    def launch_finished(self, ev: LaunchFinished) -> None:
        st = self.state
        inst = st.find(ev.slot)
        if inst is None or inst.phase == "terminated" or st.stopped or st.failed:
            # Not (or no longer) wanted: an instance nobody tracks would leak.
            if inst is not None and inst.phase != "terminated":
                inst.instance_id = ev.instance_id
                self.terminate(inst, ev.now, "launched after the pool stopped")
            elif inst is None or inst.instance_id != ev.instance_id:
                self.actions.append(Terminate(ev.instance_id, "launch nobody waits for"))
            return
        if inst.phase != "launching":
            return  # a repeated answer
        inst.instance_id = ev.instance_id
        inst.address = ev.address
        inst.phase = "booting"
        inst.since = ev.now
        inst.launched_at = ev.now

    def launch_failed(self, ev: LaunchFailed) -> None:
        inst = self.state.find(ev.slot)
        if inst is None or inst.phase != "launching":
            return
        inst.phase = "terminated"
        inst.since = ev.now
        inst.note = f"launch failed: {ev.reason}"
        if ev.permanent:
            self.fail(ev.now, ev.reason)
            return
        self.count_failure(ev.now, inst, inst.note)

    def fail(self, now: float, reason: str) -> None:
        st = self.state
        st.failed = reason
        self.actions.append(PoolFailed(reason, now))
        self.stop(now)

    # -- health --

    def check(self, inst: Instance, now: float) -> None:
        inst.check_sent_at = now
        if inst.phase == "booting":
            inst.phase = "checking"
            inst.since = now
        self.actions.append(CheckHealth(inst.slot, inst.instance_id, inst.address))

    def healthy(self, ev: InstanceHealthy) -> None:
        st = self.state
        inst = st.find(ev.instance)
        if inst is None or inst.phase not in ("booting", "checking", "ready", "active"):
            return
        inst.check_sent_at = None
        inst.last_check_at = ev.now
        inst.last_check_ok = True
        inst.failed_checks = 0
        if ev.address:
            inst.address = ev.address
        if not inst.address:
            return  # healthy, but nobody could reach it: wait for an address
        if inst.phase in STARTING_PHASES:
            inst.phase = "ready"
            inst.since = ev.now
        elif inst.launched_at >= st.last_failure_at:
            # A recheck passed by an instance launched since the last failure proves new
            # launches work again. A first success does not (a flapping standby turns ready and
            # fails again), nor does the old active one passing its checks.
            st.consecutive_failures = 0
            st.launch_not_before = 0.0

    def unhealthy(self, ref: str, now: float, detail: str) -> None:
        inst = self.state.find(ref)
        if inst is None or inst.phase not in ("booting", "checking", "ready", "active"):
            return
        inst.check_sent_at = None
        inst.last_check_at = now
        inst.last_check_ok = False
        inst.failed_checks += 1
        if inst.phase in STARTING_PHASES:
            return  # still booting: retried until the health timeout
        if inst.phase == "ready":
            # It worked and now does not: never switch to it; a fresh one replaces it.
            self.replace(inst, now, f"standby unhealthy: {detail}")
        elif inst.failed_checks >= self.config.active_max_failures:
            self.leave_active(now, "unhealthy")

    def replace(self, inst: Instance, now: float, reason: str) -> None:
        self.terminate(inst, now, reason)
        self.count_failure(now, inst, reason)

    def count_failure(self, now: float, inst: Instance, reason: str) -> None:
        st, cfg = self.state, self.config
        st.consecutive_failures += 1
        st.last_failure_at = now
        over = st.consecutive_failures - cfg.max_consecutive_failures
        if over >= 0:
            st.launch_not_before = now + min(cfg.backoff_max, cfg.backoff_base * 2**over)
        backoff = st.launch_not_before if st.launch_not_before > now else 0.0
        self.actions.append(InstanceReplaced(inst.instance_id, inst.slot, reason, now, backoff))

    def gone(self, ev: InstanceGone) -> None:
        st = self.state
        inst = st.find(ev.instance_id)
        if inst is None or inst.phase == "terminated":
            return
        was = inst.phase
        inst.phase = "terminated"
        inst.since = ev.now
        inst.check_sent_at = None
        if st.stopped or st.failed or was in ("draining", "terminating"):
            return
        inst.note = "terminated outside the pool"
        if was == "active":
            st.active_slot = ""
            st.last_active_instance = inst.instance_id
            st.pending_reason = "gone"
            if st.standbys:
                self.try_switch(ev.now)
            else:
                self.go_without_active(ev.now, "gone")
        else:
            self.count_failure(ev.now, inst, inst.note)

    # -- rotation --

    def ban(self, ev: BanReported) -> None:
        st = self.state
        active = st.active
        # Only a ban for the generation in service counts, and only once; a late report about
        # an instance already replaced changes nothing.
        if ev.generation != st.generation or st.generation == 0 or active is None:
            return
        if st.banned_generation == ev.generation:
            return
        st.banned_generation = ev.generation
        active.banned = True
        outcome = "switched" if st.standbys else "paused"
        self.actions.append(Banned(ev.generation, active.instance_id, ev.now, outcome))
        self.leave_active(ev.now, "ban")

    def leave_active(self, now: float, reason: str) -> None:
        """The active instance must not serve any more (banned or unhealthy)."""
        st = self.state
        st.pending_reason = reason
        if st.standbys:
            self.try_switch(now)
            return
        active = st.active
        assert active is not None
        st.active_slot = ""
        st.last_active_instance = active.instance_id
        self.terminate(active, now, f"left active: {reason}")
        self.go_without_active(now, reason)

    def go_without_active(self, now: float, reason: str) -> None:
        # No healthy standby: traffic stops rather than go through a bad proxy, or go direct;
        # the next standby that turns ready takes over (try_switch, at every tick).
        self.state.pending_reason = reason
        self.actions.append(Paused(reason, now))
        self.publish()

    def try_switch(self, now: float) -> None:
        st = self.state
        standbys = st.standbys
        active = st.active
        if not standbys or (active is not None and not st.pending_reason):
            return
        new = standbys[0]
        old_id = active.instance_id if active is not None else st.last_active_instance
        old_gen = st.generation
        st.generation += 1
        new.phase = "active"
        new.since = now
        new.generation = st.generation
        st.active_slot = new.slot
        if active is not None:
            active.phase = "draining"
            active.since = now
            active.check_sent_at = None
        if st.pending_reason:  # the very first activation is no rotation
            rotation = Rotation(st.pending_reason, old_id, new.instance_id, old_gen, st.generation, now)
            st.rotations = (st.rotations + [rotation])[-self.config.history :]
            st.rotations_total += 1
            self.actions.append(RotationHappened(**dataclasses.asdict(rotation)))
        st.pending_reason = ""
        st.last_active_instance = ""
        self.publish()
        self.replenish(now)

    def publish(self, force: bool = False) -> None:
        pub = announcement(self.state, self.config)
        as_dict = dataclasses.asdict(pub)
        if force or as_dict != self.state.published:
            self.state.published = as_dict
            self.actions.append(pub)

    # -- the end --

    def terminate(self, inst: Instance, now: float, reason: str) -> None:
        inst.since = now
        inst.note = reason
        inst.check_sent_at = None
        if inst.slot == self.state.active_slot:
            self.state.active_slot = ""
        if inst.instance_id:
            inst.phase = "terminating"
            self.actions.append(Terminate(inst.instance_id, reason))
        else:
            # A launch not answered yet: its LaunchFinished, if it ever comes, gets a Terminate.
            inst.phase = "terminated"

    def stop(self, now: float) -> None:
        st = self.state
        if not st.stopped:
            st.stopped = True
            st.pending_reason = ""
            for inst in st.instances:
                if inst.phase in ("launching", "booting", "checking", "ready", "active", "draining"):
                    self.terminate(inst, now, "pool stopped")
            st.active_slot = ""
            self.publish()

    def prune(self) -> None:
        st = self.state
        done = [i for i in st.instances if i.phase == "terminated"]
        for old in done[: max(0, len(done) - self.config.keep_terminated)]:
            st.instances.remove(old)
