"""The proxy pool state machine (pool.py), driven event by event like the operator drives it."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field

import pytest

from tilehopper.contracts import ProxyState
from tilehopper_operator import pool
from tilehopper_operator.pool import (
    BanReported,
    Banned,
    CheckHealth,
    HealthTimeout,
    InstanceGone,
    InstanceHealthy,
    InstanceReplaced,
    InstanceUnhealthy,
    Launch,
    LaunchFailed,
    LaunchFinished,
    Paused,
    PoolConfig,
    PoolFailed,
    PoolState,
    Publish,
    Resume,
    RotationHappened,
    Stop,
    Terminate,
    Tick,
)

CONFIG = PoolConfig(
    rotate_every=300,
    standby=1,
    drain_seconds=5,
    health_timeout=120,
    check_interval=5,
    recheck_every=30,
    check_answer_timeout=20,
    active_max_failures=2,
    launch_retry=60,
    terminate_retry=30,
    max_consecutive_failures=3,
    backoff_base=10,
    backoff_max=80,
)


@dataclass
class Sim:
    """Feeds events and keeps every action; the state round-trips through JSON at every step,
    as it does through the TileJob status."""

    config: PoolConfig = CONFIG
    state: PoolState = field(default_factory=PoolState)
    now: float = 1000.0
    log: list[pool.Action] = field(default_factory=list)

    def send(self, event: pool.Event) -> list[pool.Action]:
        state, actions = pool.step(self.state, event, self.config)
        self.state = PoolState.from_dict(json.loads(json.dumps(state.to_dict())))
        self.log += actions
        return actions

    def at(self, now: float) -> list[pool.Action]:
        self.now = now
        return self.send(Tick(now))

    def later(self, seconds: float) -> list[pool.Action]:
        return self.at(self.now + seconds)

    # -- the world answering --

    def finish_launches(self, actions: list[pool.Action]) -> list[pool.Action]:
        out: list[pool.Action] = []
        for a in actions:
            if isinstance(a, Launch):
                out += self.send(LaunchFinished(a.slot, f"i-{a.slot}", addr(a.slot), self.now))
        return out

    def answer_checks(self, actions: list[pool.Action], ok: bool = True) -> list[pool.Action]:
        out: list[pool.Action] = []
        for a in actions:
            if isinstance(a, CheckHealth):
                if ok:
                    out += self.send(InstanceHealthy(a.instance_id, self.now))
                else:
                    out += self.send(InstanceUnhealthy(a.instance_id, self.now, "refused"))
        return out

    def settle(self, ok: bool = True, rounds: int = 10) -> list[pool.Action]:
        """Answer every launch and check in flight, until nothing is in flight."""
        out = self.send(Tick(self.now))
        for _ in range(rounds):
            answers: list[pool.Event] = []
            for inst in self.state.instances:
                if inst.phase == "launching":
                    answers.append(LaunchFinished(inst.slot, f"i-{inst.slot}", addr(inst.slot), self.now))
                elif inst.check_sent_at is not None:
                    kind = InstanceHealthy if ok else InstanceUnhealthy
                    answers.append(kind(inst.instance_id, self.now))
            if not answers:
                break
            for ev in answers:
                out += self.send(ev)
        return out

    def start(self) -> None:
        """Two healthy instances: A active (generation 1), B standing by."""
        self.settle()
        assert self.state.active is not None and len(self.state.standbys) == 1

    # -- views --

    @property
    def active_id(self) -> str:
        a = self.state.active
        return a.instance_id if a else ""

    @property
    def standby_ids(self) -> list[str]:
        return [i.instance_id for i in self.state.standbys]


def addr(slot: str) -> str:
    return f"127.1.0.{int(slot.split('-')[1]) + 3}"


def of(kind: type, actions: list[pool.Action]) -> list:
    return [a for a in actions if isinstance(a, kind)]


def last_publish(sim: Sim) -> Publish:
    return of(Publish, sim.log)[-1]


# --- Start ------------------------------------------------------------------------------------


def test_first_tick_publishes_paused_and_launches_active_plus_standby():
    sim = Sim()
    actions = sim.at(1000)
    assert of(Publish, actions) == [Publish("", 0, "", ProxyState.PAUSED)]
    assert of(Launch, actions) == [Launch("proxy-1", 0), Launch("proxy-2", 0)]
    assert [i.phase for i in sim.state.instances] == ["launching", "launching"]
    # Ticking again asks for nothing new: launches are in flight.
    assert sim.later(1) == []


def test_launch_finished_then_healthy_makes_the_first_active_without_a_rotation():
    sim = Sim()
    sim.at(1000)
    acts = sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1001))
    assert of(CheckHealth, acts) == [CheckHealth("proxy-1", "i-a", "127.1.0.4")]
    assert sim.state.find("i-a").phase == "checking"
    acts = sim.send(InstanceHealthy("i-a", 1002))
    assert of(Publish, acts) == [Publish("http://127.1.0.4:8888", 1, "i-a", ProxyState.ACTIVE)]
    assert of(RotationHappened, acts) == []
    assert sim.state.generation == 1 and sim.active_id == "i-a"
    # The other slot still launching: nothing new launched.
    assert of(Launch, acts) == []


def test_boot_grace_delays_the_first_check():
    sim = Sim(config=PoolConfig(boot_grace=30, check_interval=5, health_timeout=120))
    sim.at(1000)
    assert of(CheckHealth, sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1000))) == []
    assert sim.state.find("i-a").phase == "booting"
    assert of(CheckHealth, sim.at(1029)) == []
    assert of(CheckHealth, sim.at(1030)) == [CheckHealth("proxy-1", "i-a", "127.1.0.4")]


def test_failed_checks_while_booting_are_retried_until_healthy():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1000))
    sim.send(InstanceUnhealthy("i-a", 1000, "connection refused"))
    assert sim.state.find("i-a").phase == "checking"
    assert of(CheckHealth, sim.at(1004)) == []  # check_interval is 5
    assert of(CheckHealth, sim.at(1005)) == [CheckHealth("proxy-1", "i-a", "127.1.0.4")]
    sim.send(InstanceHealthy("i-a", 1006))
    assert sim.active_id == "i-a"


def test_health_supplies_the_address_when_launch_had_none():
    sim = Sim()
    sim.at(1000)
    acts = sim.send(LaunchFinished("proxy-1", "i-a", "", 1000))
    assert of(CheckHealth, acts) == [CheckHealth("proxy-1", "i-a", "")]
    sim.send(InstanceHealthy("i-a", 1001, address="54.1.2.3"))
    assert last_publish(sim).url == "http://54.1.2.3:8888"


def test_healthy_without_any_address_is_not_published():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-1", "i-a", "", 1000))
    acts = sim.send(InstanceHealthy("i-a", 1001))
    assert of(Publish, acts) == [] and sim.state.paused


def test_start_converges_to_one_active_and_one_standby():
    sim = Sim()
    sim.start()
    assert sim.active_id == "i-proxy-1" and sim.standby_ids == ["i-proxy-2"]
    assert last_publish(sim) == Publish("http://127.1.0.4:8888", 1, "i-proxy-1", "active")


def test_more_standbys():
    sim = Sim(config=PoolConfig(standby=2))
    sim.settle()
    assert len(sim.state.standbys) == 2 and sim.state.active is not None


# --- Rotation by timer ------------------------------------------------------------------------


def test_timer_rotation_switches_at_once_drains_terminates_and_boots_the_next():
    sim = Sim()
    sim.start()
    assert of(RotationHappened, sim.at(1299)) == []
    acts = sim.at(1300)
    assert of(Publish, acts) == [Publish("http://127.1.0.5:8888", 2, "i-proxy-2", "active")]
    assert of(RotationHappened, acts) == [
        RotationHappened("timer", "i-proxy-1", "i-proxy-2", 1, 2, 1300)
    ]
    assert of(Launch, acts) == [Launch("proxy-3", 2)]
    assert sim.state.find("i-proxy-1").phase == "draining"
    assert of(Terminate, acts) == []
    assert of(Terminate, sim.at(1304)) == []
    assert of(Terminate, sim.at(1305)) == [Terminate("i-proxy-1", "drained after rotation")]
    sim.send(InstanceGone("i-proxy-1", 1310))
    assert sim.state.find("i-proxy-1").phase == "terminated"
    assert sim.state.rotations_total == 1


def test_timer_rotations_follow_the_users_algorithm_a_b_c_d():
    sim = Sim()
    sim.start()
    served = [sim.active_id]
    for _ in range(3):
        sim.at(sim.state.active.since + 300)
        sim.settle()
        served.append(sim.active_id)
        assert len(sim.state.standbys) == 1
    assert served == ["i-proxy-1", "i-proxy-2", "i-proxy-3", "i-proxy-4"]
    assert [p.generation for p in of(Publish, sim.log) if p.state == "active"] == [1, 2, 3, 4]
    assert [r.reason for r in sim.state.rotations] == ["timer"] * 3


def test_timer_due_while_standby_not_ready_keeps_the_active_until_it_is():
    sim = Sim(config=dataclasses.replace(CONFIG, health_timeout=1000))
    sim.start()
    sim.at(1300)  # A -> B; C launching
    sim.finish_launches(of(Launch, sim.log))
    # C never answers healthy; at B's due time B keeps serving, no pause, no rotation.
    acts = sim.at(1600)
    assert of(RotationHappened, acts) == [] and of(Paused, acts) == []
    assert sim.active_id == "i-proxy-2" and sim.state.pending_reason == "timer"
    assert last_publish(sim).instance_id == "i-proxy-2"
    acts = sim.send(InstanceHealthy("i-proxy-3", 1650))
    assert of(RotationHappened, acts) == [RotationHappened("timer", "i-proxy-2", "i-proxy-3", 2, 3, 1650)]
    assert sim.state.pending_reason == ""


# --- Bans -------------------------------------------------------------------------------------


def test_ban_for_current_generation_switches_at_once():
    sim = Sim()
    sim.start()
    acts = sim.send(BanReported(1, 1010))
    assert of(Banned, acts) == [Banned(1, "i-proxy-1", 1010, "switched")]
    assert of(Publish, acts) == [Publish("http://127.1.0.5:8888", 2, "i-proxy-2", "active")]
    assert of(RotationHappened, acts)[0].reason == "ban"
    assert of(Launch, acts) == [Launch("proxy-3", 1 + 1)]
    assert sim.state.find("i-proxy-1").banned


def test_two_bans_for_one_generation_make_one_rotation():
    sim = Sim()
    sim.start()
    sim.send(BanReported(1, 1010))
    acts = sim.send(BanReported(1, 1010.1))
    assert acts == []
    assert sim.state.rotations_total == 1 and sim.state.generation == 2


def test_ban_for_an_old_generation_changes_nothing():
    sim = Sim()
    sim.start()
    sim.at(1300)  # generation 2 by timer
    sim.settle()
    before = sim.state.to_dict()
    assert sim.send(BanReported(1, 1301)) == []
    assert sim.state.to_dict() == before


def test_ban_for_a_future_or_zero_generation_changes_nothing():
    sim = Sim()
    assert sim.send(BanReported(0, 1000)) == of(Publish, sim.log) + of(Launch, sim.log)
    sim.start()
    before = sim.state.generation
    assert of(RotationHappened, sim.send(BanReported(7, 1001))) == []
    assert sim.state.generation == before


def test_ban_during_a_switch_old_generation_ignored_new_generation_pauses():
    """Ban arrives right after a timer switch: the late report for the old generation changes
    nothing; a ban for the new one, with the next standby still booting, pauses."""
    sim = Sim()
    sim.start()
    sim.at(1300)  # A -> B (gen 2); A draining; C launching
    assert sim.send(BanReported(1, 1300.5)) == []
    acts = sim.send(BanReported(2, 1301))
    assert of(Banned, acts) == [Banned(2, "i-proxy-2", 1301, "paused")]
    assert of(Publish, acts) == [Publish("", 2, "", ProxyState.PAUSED)]
    assert of(Terminate, acts) == [Terminate("i-proxy-2", "left active: ban")]
    assert of(Paused, acts) == [Paused("ban", 1301)]
    # The pool launches what is missing (1 + standby), traffic never goes through B again.
    assert len(of(Launch, acts)) == 1
    sim.settle()
    pub = last_publish(sim)
    assert pub.state == "active" and pub.generation == 3 and pub.instance_id == "i-proxy-3"
    rot = sim.state.rotations[-1]
    assert (rot.reason, rot.from_instance, rot.to_instance) == ("ban", "i-proxy-2", "i-proxy-3")


def test_ban_with_no_healthy_standby_pauses_until_one_is_ready():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1000))
    sim.send(InstanceHealthy("i-a", 1001))  # active; proxy-2 still launching
    acts = sim.send(BanReported(1, 1002))
    assert of(Publish, acts) == [Publish("", 1, "", "paused")]
    assert sim.state.paused
    assert of(Launch, acts) == [Launch("proxy-3", 1)]  # replaces the banned one
    sim.send(LaunchFinished("proxy-2", "i-b", "127.1.0.5", 1003))
    acts = sim.send(InstanceHealthy("i-b", 1004))
    assert of(Publish, acts) == [Publish("http://127.1.0.5:8888", 2, "i-b", "active")]
    assert of(RotationHappened, acts) == [RotationHappened("ban", "i-a", "i-b", 1, 2, 1004)]


def test_both_banned():
    sim = Sim()
    sim.start()
    sim.send(BanReported(1, 1010))  # A banned -> B; C launching
    acts = sim.send(BanReported(2, 1011))  # B banned too, C not ready
    assert of(Banned, acts)[0].outcome == "paused"
    assert last_publish(sim).state == "paused"
    published_ids = {p.instance_id for p in of(Publish, sim.log)}
    sim.settle()
    assert sim.active_id not in {"i-proxy-1", "i-proxy-2"}
    assert last_publish(sim).generation == 3
    # Neither banned instance was ever published after its ban.
    assert {p.instance_id for p in of(Publish, sim.log)} - published_ids == {sim.active_id}
    assert {i.instance_id for i in sim.state.instances if i.banned} == {"i-proxy-1", "i-proxy-2"}


def test_rotation_due_while_paused_makes_one_rotation_when_a_standby_is_ready():
    sim = Sim()
    sim.start()
    sim.send(BanReported(1, 1010))
    sim.send(BanReported(2, 1011))  # paused
    sim.at(2000)  # long past any rotateEvery; launches still unanswered -> re-asked
    assert sim.state.paused and sim.state.rotations_total == 1
    sim.settle()
    assert sim.state.rotations_total == 2 and sim.state.rotations[-1].reason == "ban"
    assert not sim.state.paused


def test_ban_while_timer_rotation_is_pending_pauses():
    sim = Sim()
    sim.start()
    sim.at(1300)
    sim.finish_launches(of(Launch, sim.log))  # C booting, never healthy yet
    sim.at(1600)  # timer due for B, C not ready: pending
    acts = sim.send(BanReported(2, 1601))
    assert of(Publish, acts) == [Publish("", 2, "", "paused")]
    assert sim.state.pending_reason == "ban"


# --- Health -----------------------------------------------------------------------------------


def test_health_timeout_replaces_the_instance():
    sim = Sim()
    sim.start()
    sim.send(BanReported(1, 1010))  # C launching at 1010
    sim.finish_launches(of(Launch, sim.log)[-1:])
    c = sim.state.find("proxy-3")
    assert c.phase == "checking"
    acts = sim.at(c.launched_at + 120)
    assert Terminate("i-proxy-3", "not healthy within the health timeout") in acts
    assert of(InstanceReplaced, acts)[0].instance_id == "i-proxy-3"
    assert of(Launch, acts) == [Launch("proxy-4", 2)]


def test_health_timeout_event_replaces_a_starting_instance():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1000))
    acts = sim.send(HealthTimeout("i-a", 1001))
    assert of(Terminate, acts) == [Terminate("i-a", "not healthy within the health timeout")]
    assert of(Launch, acts) == [Launch("proxy-3", 0)]


def test_standby_unhealthy_is_replaced_and_never_switched_to():
    sim = Sim()
    sim.start()
    acts = sim.later(30)  # rechecks due for A and B
    assert {c.instance_id for c in of(CheckHealth, acts)} == {"i-proxy-1", "i-proxy-2"}
    acts = sim.send(InstanceUnhealthy("i-proxy-2", sim.now, "timeout"))
    assert of(Terminate, acts) == [Terminate("i-proxy-2", "standby unhealthy: timeout")]
    assert of(Launch, acts) == [Launch("proxy-3", 1)]
    acts = sim.send(BanReported(1, sim.now))  # no standby now: pause, never B
    assert last_publish(sim).state == "paused"
    assert all(p.instance_id != "i-proxy-2" for p in of(Publish, sim.log))


def test_active_rotated_away_after_repeated_failed_checks():
    sim = Sim()
    sim.start()
    sim.later(30)
    sim.send(InstanceHealthy("i-proxy-2", sim.now))
    acts = sim.send(InstanceUnhealthy("i-proxy-1", sim.now))
    assert of(RotationHappened, acts) == []  # one failure may be a glitch
    sim.later(30)
    sim.send(InstanceHealthy("i-proxy-2", sim.now))
    acts = sim.send(InstanceUnhealthy("i-proxy-1", sim.now))
    assert of(RotationHappened, acts)[0].reason == "unhealthy"
    assert sim.active_id == "i-proxy-2"


def test_a_recovered_active_check_resets_its_failures():
    sim = Sim()
    sim.start()
    for _ in range(3):
        sim.later(30)
        sim.send(InstanceUnhealthy("i-proxy-1", sim.now))
        sim.send(InstanceHealthy("i-proxy-1", sim.now))
    assert sim.active_id == "i-proxy-1" and sim.state.rotations_total == 0


def test_lost_check_answer_is_asked_again():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1000))
    assert of(CheckHealth, sim.at(1019)) == []
    assert of(CheckHealth, sim.at(1020)) == [CheckHealth("proxy-1", "i-a", "127.1.0.4")]


NO_TIMER = dataclasses.replace(CONFIG, rotate_every=1e9)  # flapping alone, no timer rotations


def test_flapping_standby_never_empties_the_pool_and_backs_off():
    sim = Sim(config=NO_TIMER)
    sim.start()
    t = sim.now
    launch_times = []
    for _ in range(8):
        # The standby turns ready, then fails its recheck: flapping.
        t += 30
        acts = sim.at(t)
        for a in of(CheckHealth, acts):
            if a.instance_id == "i-proxy-1":
                sim.send(InstanceHealthy(a.instance_id, t))
            else:
                sim.send(InstanceUnhealthy(a.instance_id, t, "flap"))
        # Let the replacement launch (maybe after a backoff) and turn ready.
        for _ in range(20):
            if sim.state.standbys:
                break
            t += 5
            acts = sim.at(t)
            launches = of(Launch, acts)
            launch_times += [t for _ in launches]
            sim.finish_launches(launches)
            for a in of(CheckHealth, sim.log[-5:]):
                if sim.state.find(a.instance_id).phase == "checking":
                    sim.send(InstanceHealthy(a.instance_id, t))
        assert sim.active_id == "i-proxy-1"  # the active one is never touched
        assert not sim.state.paused
    gaps = [b - a for a, b in zip(launch_times, launch_times[1:])]
    assert max(gaps) > min(gaps)  # launches spread out: backoff
    assert sim.state.launch_not_before > 0
    replaced = of(InstanceReplaced, sim.log)
    assert replaced[-1].backoff_until > replaced[-1].at
    assert replaced[-1].backoff_until - replaced[-1].at <= CONFIG.backoff_max


def test_standby_that_never_gets_healthy_keeps_being_replaced_with_backoff():
    sim = Sim(config=NO_TIMER)
    sim.start()
    sim.send(InstanceGone("i-proxy-2", sim.now))  # the standby died
    launches = []
    for t in range(int(sim.now) + 2, int(sim.now) + 2000, 2):
        acts = sim.at(t)
        launches += [(t, a) for a in of(Launch, acts)]
        sim.finish_launches(of(Launch, acts))
        for a in of(CheckHealth, sim.log[-6:]):
            if sim.state.find(a.instance_id) and sim.state.find(a.instance_id).check_sent_at:
                healthy = a.instance_id == "i-proxy-1"
                sim.send((InstanceHealthy if healthy else InstanceUnhealthy)(a.instance_id, t))
        assert len([i for i in sim.state.live if i.phase != "launching"]) >= 1
        assert sim.active_id == "i-proxy-1"
    gaps = [b[0] - a[0] for a, b in zip(launches, launches[1:])]
    # health_timeout 120 (+ up to backoff_max 80) between replacements, never faster.
    assert min(gaps) >= 120 and max(gaps) <= 120 + 80 + 2
    assert len(launches) >= 8


def test_recheck_success_resets_backoff():
    sim = Sim(config=NO_TIMER)
    sim.start()
    for _ in range(4):
        sim.send(InstanceGone(sim.standby_ids[0], sim.now)) if sim.standby_ids else None
        sim.later(200)
        sim.settle()
    assert sim.state.consecutive_failures >= 3
    sim.later(30)
    sim.settle()
    assert sim.state.consecutive_failures == 0 and sim.state.launch_not_before == 0


# --- Gone, launch failures --------------------------------------------------------------------


def test_active_gone_switches_to_standby():
    sim = Sim()
    sim.start()
    acts = sim.send(InstanceGone("i-proxy-1", sim.now))
    assert of(RotationHappened, acts) == [RotationHappened("gone", "i-proxy-1", "i-proxy-2", 1, 2, sim.now)]
    assert of(Terminate, acts) == []  # already gone
    assert of(Launch, acts) == [Launch("proxy-3", 2)]
    assert len(of(Publish, acts)) == 1


def test_active_gone_without_standby_pauses():
    sim = Sim()
    sim.start()
    sim.send(InstanceGone("i-proxy-2", sim.now))
    acts = sim.send(InstanceGone("i-proxy-1", sim.now))
    assert of(Publish, acts) == [Publish("", 1, "", "paused")]
    assert of(Paused, acts) == [Paused("gone", sim.now)]


def test_gone_after_terminate_is_normal():
    sim = Sim()
    sim.start()
    sim.at(1300)
    sim.at(1305)
    acts = sim.send(InstanceGone("i-proxy-1", 1306))
    assert of(InstanceReplaced, acts) == [] and sim.state.consecutive_failures == 0


def test_unconfirmed_terminate_is_repeated():
    sim = Sim()
    sim.start()
    sim.at(1300)
    assert of(Terminate, sim.at(1305)) == [Terminate("i-proxy-1", "drained after rotation")]
    assert of(Terminate, sim.at(1334)) == []
    assert of(Terminate, sim.at(1335)) == [Terminate("i-proxy-1", "drained after rotation")]


def test_unanswered_launch_is_repeated_with_the_same_slot():
    sim = Sim()
    sim.at(1000)
    acts = sim.at(1060)
    assert of(Launch, acts) == [Launch("proxy-1", 0), Launch("proxy-2", 0)]
    assert sim.state.next_slot == 3


def test_transient_launch_failure_launches_a_new_slot():
    sim = Sim()
    sim.at(1000)
    acts = sim.send(LaunchFailed("proxy-1", "no capacity in t3.micro, t2.micro", False, 1001))
    assert of(Launch, acts) == [Launch("proxy-3", 0)]
    assert of(InstanceReplaced, acts)[0].reason.startswith("launch failed")


def test_permanent_launch_failure_fails_and_stops_the_pool():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-2", "i-b", "127.1.0.5", 1000))
    acts = sim.send(LaunchFailed("proxy-1", "AuthFailure: bad credentials", True, 1001))
    assert of(PoolFailed, acts) == [PoolFailed("AuthFailure: bad credentials", 1001)]
    assert of(Terminate, acts) == [Terminate("i-b", "pool stopped")]
    assert sim.state.failed and sim.state.stopped
    assert of(Launch, sim.later(500)) == []


def test_launch_finished_for_an_unknown_slot_is_terminated():
    sim = Sim()
    sim.at(1000)
    acts = sim.send(LaunchFinished("proxy-99", "i-stray", "127.1.0.99", 1000))
    assert of(Terminate, acts) == [Terminate("i-stray", "launch nobody waits for")]


def test_repeated_launch_finished_is_harmless():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1000))
    acts = sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1001))
    assert of(Terminate, acts) == [] and of(Launch, acts) == []


# --- Stop -------------------------------------------------------------------------------------


def test_stop_terminates_all_and_publishes_paused():
    sim = Sim()
    sim.start()
    sim.at(1300)  # A draining, B active, C launching
    acts = sim.send(Stop(1301))
    assert of(Publish, acts) == [Publish("", 2, "", "paused")]
    assert {t.instance_id for t in of(Terminate, acts)} == {"i-proxy-1", "i-proxy-2"}
    assert sim.state.find("proxy-3").phase == "terminated"  # its launch was never answered
    # The late answer of C's launch is terminated at once.
    acts = sim.send(LaunchFinished("proxy-3", "i-c", "127.1.0.6", 1302))
    assert of(Terminate, acts) == [Terminate("i-c", "launch nobody waits for")]
    assert not sim.state.finished
    for iid in ("i-proxy-1", "i-proxy-2"):
        sim.send(InstanceGone(iid, 1303))
    assert sim.state.finished
    # Nothing restarts a stopped pool.
    for ev in (BanReported(2, 1400), Tick(5000), InstanceHealthy("i-proxy-2", 5000)):
        assert of(Launch, sim.send(ev)) + of(Publish, sim.log[-1:]) == []
    assert pool.next_wakeup(sim.state, CONFIG) is None


def test_stop_twice_is_harmless():
    sim = Sim()
    sim.start()
    sim.send(Stop(1100))
    assert sim.send(Stop(1101)) == []


# --- Crashes: serialisation and resume --------------------------------------------------------


def test_serialisation_round_trip_mid_rotation():
    sim = Sim()
    sim.start()
    sim.at(1300)  # mid-rotation: A draining, B active, C launching
    sim.send(BanReported(1, 1300.5))
    data = json.loads(json.dumps(sim.state.to_dict()))
    restored = PoolState.from_dict(data)
    assert restored == sim.state
    # The restored pool carries on exactly like the original.
    twin = Sim(state=restored, now=sim.now)
    assert twin.at(1305) == sim.at(1305)


def test_from_dict_of_nothing_is_a_fresh_pool():
    assert PoolState.from_dict(None) == PoolState()
    assert PoolState.from_dict({}) == PoolState()


def test_from_dict_ignores_unknown_keys_from_a_newer_operator():
    data = PoolState().to_dict() | {"somethingNew": 1}
    assert PoolState.from_dict(data) == PoolState()


def test_resume_repeats_launches_with_the_same_slots_and_republishes():
    sim = Sim()
    sim.start()
    sim.at(1300)
    sim.at(1305)  # A terminating, C launching
    acts = sim.send(Resume(1306))
    assert Launch("proxy-3", 2) in acts
    assert Terminate("i-proxy-1", "drained after rotation") in acts
    assert of(Publish, acts) == [Publish("http://127.1.0.5:8888", 2, "i-proxy-2", "active")]
    assert sim.state.next_slot == 4  # no new slot: a relaunch finds the same instance by tag


def test_resume_asks_lost_checks_again():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1000))  # check in flight
    acts = sim.send(Resume(1001))
    assert CheckHealth("proxy-1", "i-a", "127.1.0.4") in acts


def test_slots_are_deterministic():
    a, b = Sim(), Sim()
    for s in (a, b):
        s.start()
        s.send(BanReported(1, 1010))
        s.settle()
    assert [i.slot for i in a.state.instances] == [i.slot for i in b.state.instances]


# --- next_wakeup and announcement -------------------------------------------------------------


def test_next_wakeup_names_the_rotation_time():
    sim = Sim()
    sim.start()
    sim.later(29.5)
    sim.answer_checks(sim.later(0.5))
    assert pool.next_wakeup(sim.state, CONFIG) == sim.now + 30  # next recheck
    cfg = PoolConfig(rotate_every=10, recheck_every=30)
    assert pool.next_wakeup(sim.state, cfg) == sim.state.active.since + 10


def test_next_wakeup_when_a_tick_changes_something_it_is_not_in_the_future():
    """Ticking earlier than next_wakeup never produces actions (so a driver may sleep)."""
    rng = random.Random(7)
    sim = Sim()
    sim.start()
    for _ in range(200):
        wake = pool.next_wakeup(sim.state, CONFIG)
        assert wake is not None
        if wake > sim.now + 1:
            assert sim.at(rng.uniform(sim.now, wake - 0.01)) == []
        acts = sim.at(max(wake, sim.now))
        sim.finish_launches(acts)
        sim.answer_checks(acts, ok=rng.random() < 0.9)


def test_announcement_matches_the_last_publish():
    sim = Sim()
    sim.start()
    sim.send(BanReported(1, 1001))
    assert pool.announcement(sim.state, CONFIG) == last_publish(sim)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        PoolConfig(standby=0)
    with pytest.raises(ValueError):
        PoolConfig(rotate_every=0)


# --- Random event sequences: invariants -------------------------------------------------------


class World:
    """A random world: launches finish or fail, checks pass or fail, instances vanish, consumers
    report bans (current and stale generations), the operator crashes and resumes."""

    def __init__(self, seed: int, config: PoolConfig) -> None:
        self.rng = random.Random(seed)
        self.sim = Sim(config=config)
        self.pending_launches: list[str] = []
        self.pending_checks: list[str] = []
        self.alive: set[str] = set()
        self.terminating: set[str] = set()  # asked to terminate, not yet confirmed
        self.banned: set[str] = set()
        self.healthy_ids: set[str] = set()  # last answered check was ok
        self.max_generation = 0
        self.published: tuple[int, str] | None = None

    def observe(self, actions: list[pool.Action]) -> None:
        for a in actions:
            if isinstance(a, Launch):
                self.pending_launches.append(a.slot)
            elif isinstance(a, CheckHealth):
                self.pending_checks.append(a.instance_id)
            elif isinstance(a, Terminate):
                self.terminating.add(a.instance_id)
            elif isinstance(a, Publish):
                assert a.generation >= self.max_generation, "generation went back"
                if a.state == ProxyState.ACTIVE:
                    assert a.instance_id not in self.banned, "published a banned instance"
                    if not self.published or self.published[0] != a.generation:
                        assert a.instance_id in self.healthy_ids, "switched to an unchecked instance"
                    assert a.url.startswith("http://") and "@" not in a.url
                    # A new instance always comes with a new generation; a re-publish (Resume)
                    # repeats the same pair.
                    if self.published and self.published[0] == a.generation:
                        assert self.published[1] == a.instance_id
                    elif self.published:
                        assert a.generation > self.published[0]
                    self.published = (a.generation, a.instance_id)
                self.max_generation = a.generation
        st = self.sim.state
        assert sum(1 for i in st.instances if i.phase == "active") <= 1
        assert (st.active is None) == (st.active_slot == "")
        assert st.generation >= self.max_generation
        assert len(st.live) <= self.sim.config.target  # never more instances than asked for
        terminated = [i for i in st.instances if i.phase == "terminated"]
        assert len(terminated) <= self.sim.config.keep_terminated  # the state stays small

    def send(self, ev: pool.Event) -> None:
        self.observe(self.sim.send(ev))

    def random_event(self) -> None:
        rng, sim = self.rng, self.sim
        roll = rng.random()
        now = sim.now
        if roll < 0.25:
            sim.now += rng.choice([0.5, 1, 5, 30, 120, 300])
            self.send(Tick(sim.now))
        elif roll < 0.40 and self.pending_launches:
            slot = self.pending_launches.pop(rng.randrange(len(self.pending_launches)))
            if rng.random() < 0.85:
                iid = f"i-{slot}"
                self.alive.add(iid)
                self.send(LaunchFinished(slot, iid, addr(slot), now))
            else:
                self.send(LaunchFailed(slot, "InsufficientInstanceCapacity", False, now))
        elif roll < 0.60 and self.pending_checks:
            iid = self.pending_checks.pop(rng.randrange(len(self.pending_checks)))
            if iid in self.alive and rng.random() < 0.8:
                self.healthy_ids.add(iid)
                self.send(InstanceHealthy(iid, now))
            else:
                self.healthy_ids.discard(iid)
                self.send(InstanceUnhealthy(iid, now, "refused"))
        elif roll < 0.72:
            gen = sim.state.generation - (1 if rng.random() < 0.3 else 0)
            active = sim.state.active
            if active is not None and gen == sim.state.generation and sim.state.generation > 0:
                self.banned.add(active.instance_id)
            self.send(BanReported(gen, now))
        elif roll < 0.77 and self.alive:
            # Gone: mostly one we asked to terminate, sometimes one that died by itself.
            asked = sorted(self.terminating & self.alive)
            iid = rng.choice(asked if asked and rng.random() < 0.7 else sorted(self.alive))
            self.alive.discard(iid)
            self.terminating.discard(iid)
            self.send(InstanceGone(iid, now))
        elif roll < 0.80:
            self.pending_checks.clear()  # the crashed operator's checks die with it
            self.send(Resume(now))
        elif roll < 0.83:
            # A round trip through JSON, as through the TileJob status.
            sim.state = PoolState.from_dict(json.loads(json.dumps(sim.state.to_dict())))
        else:
            sim.now += 1
            self.send(Tick(sim.now))

    def converged(self) -> bool:
        st = self.sim.state
        return (
            st.active is not None
            and len(st.standbys) == self.sim.config.standby
            and all(i.phase in ("ready", "active", "terminated") for i in st.instances)
        )

    def calm(self, rounds: int = 400) -> None:
        """The world turns kind: everything launches and is healthy, no bans."""
        for _ in range(rounds):
            if self.converged():
                return
            self.sim.now += 5
            self.send(Tick(self.sim.now))
            while self.pending_launches:
                slot = self.pending_launches.pop()
                self.alive.add(f"i-{slot}")
                self.send(LaunchFinished(slot, f"i-{slot}", addr(slot), self.sim.now))
            while self.pending_checks:
                iid = self.pending_checks.pop()
                ok = iid in self.alive
                (self.healthy_ids.add if ok else self.healthy_ids.discard)(iid)
                self.send((InstanceHealthy if ok else InstanceUnhealthy)(iid, self.sim.now))
            # Terminations finish.
            for inst in self.sim.state.instances:
                if inst.phase == "terminating":
                    self.alive.discard(inst.instance_id)
                    self.send(InstanceGone(inst.instance_id, self.sim.now))


@pytest.mark.parametrize("seed", range(60))
def test_random_event_sequences_keep_the_invariants(seed):
    cfg = CONFIG if seed % 2 else PoolConfig(
        rotate_every=60, standby=2, health_timeout=60, drain_seconds=2, backoff_max=120
    )
    world = World(seed, cfg)
    for _ in range(400):
        world.random_event()
    world.calm()
    st = world.sim.state
    # Converges to 1 active + `standby` ready, published active.
    assert st.active is not None, "the pool stayed paused in a kind world"
    assert len(st.standbys) == cfg.standby
    assert len(st.live) == cfg.target
    assert pool.announcement(st, cfg).state == ProxyState.ACTIVE
    assert st.active.instance_id not in world.banned
    # Stop ends with everything terminated.
    world.send(Stop(world.sim.now))
    world.calm(rounds=3)
    world.sim.now += 1
    world.send(Tick(world.sim.now))
    for inst in world.sim.state.instances:
        if inst.phase != "terminated":
            world.send(InstanceGone(inst.instance_id, world.sim.now))
    assert world.sim.state.finished
    assert last_publish(world.sim).state == ProxyState.PAUSED


def test_step_all_equals_stepping_one_by_one():
    events = [Tick(1000), LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1001), InstanceHealthy("proxy-1", 1002)]
    together, actions = pool.step_all(PoolState(), events, CONFIG)
    sim = Sim()
    for ev in events:
        sim.send(ev)
    assert together == sim.state and actions == sim.log


def test_health_answers_may_name_the_slot():
    sim = Sim()
    sim.at(1000)
    sim.send(LaunchFinished("proxy-1", "i-a", "127.1.0.4", 1000))
    sim.send(InstanceHealthy("proxy-1", 1001))
    assert sim.active_id == "i-a"
