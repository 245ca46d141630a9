"""Cost-aware admission: the ingress bounds the *work* it has admitted, not the number of requests (issue 15).

A request's cost is its sampling work in pixel-steps: ``n x steps x width x height``. Sampling time
grows with each factor (images are a batch dimension, steps are UNet calls, pixels the UNet's
spatial size), so one number ranks a 4-image, 50-step 64x64 request against a default one before
either runs. The bound is on the sum over admitted, unfinished requests (``admission.max_queued_work``).
Why work units and not measured seconds for the bound: the cost is known exactly at admission,
the same on every machine, cannot be moved by timing noise on a busy box, and bounds a server that
has not finished a request yet; seconds enter only through the measured throughput (pixel-steps
per second of busy time, as requests finish), which turns the queued work into the ``Retry-After``
of a 503: the time until enough of it drains for the rejected request to fit.

A request costing more than the whole budget is admitted only into an empty queue (it then runs
alone) rather than never. Everything here runs on the ingress's event loop, before any call to the
generator, so a 503 costs no more than parsing the request. Nothing here imports Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


def job_cost(n: int, steps: int, width: int, height: int) -> int:
    """Sampling work of one request in pixel-steps."""
    return int(n) * max(1, int(steps)) * int(width) * int(height)


class Overbudget(Exception):
    """Admitting the request would exceed the work budget; ``retry_after_s`` says when it may fit."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Ticket:
    cost: int
    admitted_at: float


class WorkBudget:
    """Admitted work, the bound on it, and the measured rate at which it drains.

    ``admit(cost)`` returns a :class:`Ticket` or raises :class:`Overbudget`; ``release(ticket)``
    when the request has finished (served or failed). Throughput is finished work over *busy* time
    (time with at least one request admitted), both decayed with time constant ``window_s`` so the
    estimate follows the current mix of requests.
    """

    def __init__(self, max_work: int, max_requests: int | None = None, fallback_retry_after_s: int = 1,
                 max_retry_after_s: int = 120, window_s: float = 60.0, clock=time.monotonic):
        if max_work < 1:
            raise ValueError(f"max_work={max_work}: must be >= 1 pixel-step")
        self.max_work, self.max_requests = int(max_work), max_requests
        self.fallback_retry_after_s, self.max_retry_after_s = int(fallback_retry_after_s), int(max_retry_after_s)
        self.window_s, self.clock = float(window_s), clock
        self.queued_work = 0
        self.in_flight = 0
        self._done_work = 0.0  # decayed pixel-steps finished
        self._busy_s = 0.0  # decayed seconds with work admitted
        self._last = clock()

    # -- bookkeeping ------------------------------------------------------------------------

    def _advance(self) -> None:
        now = self.clock()
        elapsed = max(0.0, now - self._last)
        decay = math.exp(-elapsed / self.window_s)
        self._done_work *= decay
        self._busy_s *= decay
        if self.in_flight:
            self._busy_s += elapsed
        self._last = now

    def work_per_s(self) -> float | None:
        """Measured throughput in pixel-steps per busy second; None before any request finished."""
        self._advance()
        if self._done_work <= 0 or self._busy_s <= 0:
            return None
        return self._done_work / self._busy_s

    def seconds_to_drain(self, work: float) -> int:
        """Whole seconds (>= 1, <= max_retry_after_s) for ``work`` pixel-steps to finish at the measured rate."""
        rate = self.work_per_s()
        if rate is None:
            return self.fallback_retry_after_s
        return max(1, min(self.max_retry_after_s, math.ceil(work / rate)))

    # -- admission --------------------------------------------------------------------------

    def refusal(self, cost: int, requests: int | None = None) -> Overbudget | None:
        """Why a request of ``cost`` would be refused now (None: it would be admitted). ``requests``:
        how many requests to count against ``max_requests`` (default: those admitted)."""
        self._advance()
        requests = self.in_flight if requests is None else requests
        if self.max_requests is not None and requests >= self.max_requests:
            # Room for one more request when the average one in flight finishes.
            return Overbudget(f"{requests} requests in flight, capacity {self.max_requests}",
                              self.seconds_to_drain(self.queued_work / max(1, self.in_flight)))
        if self.in_flight and self.queued_work + cost > self.max_work:
            # Retry when enough of the queued work has drained for this request to fit (all of it,
            # for a request larger than the whole budget: those run alone).
            excess = self.queued_work + cost - self.max_work if cost <= self.max_work else self.queued_work
            return Overbudget(f"{self.queued_work} pixel-steps queued + {cost} asked > budget {self.max_work}",
                              self.seconds_to_drain(excess))
        return None

    def admit(self, cost: int) -> Ticket:
        refused = self.refusal(cost)
        if refused is not None:
            raise refused
        self.queued_work += cost
        self.in_flight += 1
        return Ticket(cost=cost, admitted_at=self.clock())

    def release(self, ticket: Ticket, finished: bool = True) -> None:
        """The request is over; ``finished`` False (it failed) keeps its work out of the throughput."""
        self._advance()
        self.queued_work -= ticket.cost
        self.in_flight -= 1
        if finished:
            self._done_work += ticket.cost

    def snapshot(self) -> dict[str, float | int | None]:
        rate = self.work_per_s()
        return {"queued_work": self.queued_work, "in_flight": self.in_flight, "max_work": self.max_work,
                "work_per_s": None if rate is None else round(rate, 1)}
