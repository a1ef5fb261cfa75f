"""The flow's stages as timed blocks (`StepStages`), each a kill point for the kill tests, and the
fault injection itself: SIGKILL this process at a chosen moment inside a stage.

    GRPO_KILL_AT="<stage>:<step>:<seconds>"   e.g.  rollout:2:0.35

kills the process <seconds> after it enters <stage> at <step> (prep is step 0), or at the end of
the stage if it finishes sooner, so the kill always lands inside the stage. Unset (the normal
case), `kill_point` does nothing. Nothing is cleaned up: this is what a node loss or an OOM
killer does to the flow process, and what resume must survive.

    GRPO_HANG_AT="<worker method>:<rank>:<seconds>"   e.g.  update_actor:1:60

makes that rank's worker sleep <seconds> on entering that method (every call), the others going on
into their collectives: a hung rank, for the collective-timeout test (`hang_point`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

STAGES = ("prep", "rollout", "reward", "update", "checkpoint", "eval", "logging")


def _target() -> tuple[str, int, float] | None:
    spec = os.environ.get("GRPO_KILL_AT")
    if not spec:
        return None
    stage, step, delay = spec.split(":")
    if stage not in STAGES:
        raise ValueError(f"GRPO_KILL_AT={spec}: stage must be one of {', '.join(STAGES)}")
    return stage, int(step), float(delay)


@contextmanager
def kill_point(stage: str, step: int = 0):
    target = _target()
    if target is None or target[:2] != (stage, step):
        yield
        return
    t0 = time.perf_counter()

    def die(where: str) -> None:
        print(
            f"killpoint: SIGKILL in {stage} at step {step}, {time.perf_counter() - t0:.3f} s in ({where})",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(target[2], die, args=("timer",))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        die("stage end")


class StepStages:
    """One step's stages: each `stage(...)` block is timed into `timing` and may be a kill point.

        stages = StepStages(step)
        with stages.stage("rollout", timed="gen"):   # kill point rollout:<step>, timing_s/gen
            ...
        stages.timing                                # {"timing_s/gen": seconds, ...}

    Seconds are wall-clock (time.perf_counter) from entering the block to leaving it, the kill
    point's own start and end included."""

    def __init__(self, step: int = 0):
        self.step, self.timing = step, {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, kill_at: str | None = None, timed: str | None = None):
        """kill_at: one of STAGES, a kill point at this step (GRPO_KILL_AT); timed: the block's
        seconds go to timing[f"timing_s/{timed}"]. Either may be None."""
        t = time.perf_counter()
        with kill_point(kill_at, self.step) if kill_at else nullcontext():
            yield
        if timed:
            self.timing[f"timing_s/{timed}"] = time.perf_counter() - t

    def elapsed(self) -> float:
        """Seconds since this step began (the StepStages was made)."""
        return time.perf_counter() - self._start


def hang_point(method: str, rank: int) -> None:
    """Sleep here if GRPO_HANG_AT names this worker method and rank (see the module docstring)."""
    spec = os.environ.get("GRPO_HANG_AT")
    if not spec:
        return
    where, who, seconds = spec.split(":")
    if (where, int(who)) == (method, rank):
        print(f"hangpoint: rank {rank} (pid {os.getpid()}) sleeps {seconds} s in {method}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))
