"""The TileJob's status, derived from the pool's state and the work's progress (never stored twice)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from tilehopper_operator import pool

if TYPE_CHECKING:
    from tilehopper_operator.runtime import Progress


def iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _instance(inst: pool.Instance, port: int) -> dict[str, Any]:
    return {
        "instanceId": inst.instance_id,
        "address": f"{inst.address}:{port}" if inst.address else "",
        "generation": inst.generation,
        "since": iso(inst.since),
        "phase": inst.phase,
    }


def pool_fields(state: pool.PoolState, config: pool.PoolConfig) -> dict[str, Any]:
    active = state.active
    by_reason: dict[str, int] = {}
    for rotation in state.rotations:
        by_reason[rotation.reason] = by_reason.get(rotation.reason, 0) + 1
    return {
        "active": _instance(active, config.proxy_port) if active else None,
        "standby": [_instance(i, config.proxy_port) for i in state.instances if i.phase in pool.STARTING_PHASES + ("ready",)],
        "generation": state.generation,
        "rotations": state.rotations_total,
        "rotationsByReason": by_reason,
        "rotationHistory": [
            {"reason": r.reason, "from": r.from_instance, "to": r.to_instance,
             "generation": r.to_generation, "at": iso(r.at)}
            for r in state.rotations
        ],
    }


def _condition(type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message,
            "lastTransitionTime": iso(dt.datetime.now(dt.UTC).timestamp())}


def _ready(state: pool.PoolState, completed: bool) -> tuple[str, str]:
    if state.active is not None:
        return "ProxyActive", f"generation {state.generation}"
    if completed:
        return "Completed", "the work is finished and every proxy is removed"
    if state.failed:
        return "Failed", state.failed
    return "NoHealthyProxy", "consumers wait for a healthy proxy"


def progress_fields(progress: Progress, state: pool.PoolState, completed: bool) -> dict[str, Any]:
    total = progress.total
    finished = progress.done + progress.failed
    percent = int(100 * finished / total) if total else 0
    rate = progress.rate()
    remaining = max(0, total - finished)
    eta = int(remaining / rate) if rate > 0 and not completed else None
    if state.failed:
        phase = "Failed"
    elif completed:
        phase = "Completed"
    elif state.active is not None:
        phase = "Running"
    else:
        phase = "Provisioning"
    paused = state.active is None and not completed and not state.failed
    return {
        "phase": phase,
        "total": total,
        "done": progress.done,
        "failed": progress.failed,
        "missing": getattr(progress, "missing", 0),
        "remaining": remaining,
        "progress": f"{percent}%",
        "tilesSummary": f"{finished}/{total}",
        "ratePerSecond": round(rate, 1),
        "eta": f"{eta}s" if eta is not None else None,
        "conditions": [
            _condition("Ready", state.active is not None, *_ready(state, completed)),
            _condition("Progressing", not completed and not state.failed,
                       "Downloading" if not completed else "Completed", f"{finished}/{total} tiles"),
            _condition("Degraded", bool(state.failed) or (paused and state.generation > 0),
                       "PoolFailed" if state.failed else ("Paused" if paused else "AsExpected"),
                       state.failed or ("no healthy standby after a ban" if paused else "")),
        ],
    }
