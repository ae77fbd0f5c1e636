"""A step simulator: one compute stream and one communication stream per device. Pure data in, pure data out.

Each :class:`Phase` step gives, per device, the compute seconds and the
transfers it starts (:class:`Transfer`: sender, receiver, seconds, whether it
carries an *input* the next step needs or a *result* of this step's compute).
The rules, the ones a ring, an all-gather and an all-to-all follow:

* a device starts step s when its compute of step s−1 is done and every
  input sent to it in step s−1 has arrived (results sent in step s−1 may
  arrive until the end of step s+1: the receiver folds them in a step later);
* inputs leave at the start of the step, results when the sender's compute
  of that step ends; a stream does one thing at a time, in order;
* a point-to-point transfer starts when both ends are in the step; a
  collective (``sync=True``) starts on every device of the step together,
  once the last one has joined.

So a ring step lasts ``max(compute, transfer)``: the transfer hides when it
is shorter (Liu et al.'s condition), and a collective blocks everyone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Transfer:
    src: int
    dst: int
    seconds: float
    result: bool = False  # True: leaves after the sender's compute of this step


@dataclasses.dataclass(frozen=True)
class Phase:
    """One step: compute seconds per device, the transfers, and whether they form one collective."""

    label: str
    compute: tuple[float, ...]
    transfers: tuple[Transfer, ...]
    sync: bool = False


@dataclasses.dataclass(frozen=True)
class Interval:
    device: int
    stream: str  # "compute" or "comm"
    start: float
    end: float
    step: int
    label: str


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Every interval of every stream, and the time the last one ends."""

    intervals: tuple[Interval, ...]
    total: float
    devices: int

    def of(self, device: int, stream: str | None = None) -> list[Interval]:
        """One device's intervals (one stream, or both), in time order."""
        return sorted((i for i in self.intervals if i.device == device and (stream is None or i.stream == stream)),
                      key=lambda i: (i.start, i.stream))

    def busy(self, device: int, stream: str) -> float:
        return sum(i.end - i.start for i in self.of(device, stream))


def simulate(steps: Sequence[Phase], devices: int) -> Timeline:
    """Play ``steps`` on ``devices`` devices with the rules of the module docstring; returns the :class:`Timeline`."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive int, got {devices!r}")
    ready = [0.0] * devices  # when each device may start the next step
    late = [0.0] * devices  # results that must land before the step after next
    comp_free, comm_free = [0.0] * devices, [0.0] * devices
    out: list[Interval] = []
    for s, st in enumerate(steps):
        if len(st.compute) != devices:
            raise ValueError(f"step {s} ({st.label}) has compute for {len(st.compute)} devices, expected {devices}")
        start = [max(ready[i], comp_free[i]) for i in range(devices)]
        end = list(start)
        for i, sec in enumerate(st.compute):
            if sec > 0:
                end[i] = start[i] + sec
                out.append(Interval(i, "compute", start[i], end[i], s, st.label))
            comp_free[i] = end[i]
        arrive = list(end)
        late_next = [0.0] * devices
        if st.sync and st.transfers:
            members = sorted({t.src for t in st.transfers} | {t.dst for t in st.transfers})
            after = {t.src for t in st.transfers if t.result}
            t0 = max(max(end[i] if i in after else start[i], comm_free[i]) for i in members)
            per = dict.fromkeys(members, 0.0)
            for t in st.transfers:
                per[t.src] += t.seconds
            t1 = t0 + max(per.values())
            for i in members:
                if per[i] > 0:
                    out.append(Interval(i, "comm", t0, t0 + per[i], s, st.label))
                comm_free[i] = t1
                arrive[i] = max(arrive[i], t1)
        else:
            for t in st.transfers:
                begin = max(comm_free[t.src], end[t.src] if t.result else max(start[t.src], start[t.dst]))
                finish = begin + t.seconds
                if t.seconds > 0:
                    out.append(Interval(t.src, "comm", begin, finish, s, st.label))
                comm_free[t.src] = finish
                if t.result:
                    late_next[t.dst] = max(late_next[t.dst], finish)
                else:
                    arrive[t.dst] = max(arrive[t.dst], finish)
                    arrive[t.src] = max(arrive[t.src], finish)  # its buffer is free again
        ready = [max(arrive[i], late[i]) for i in range(devices)]
        late = late_next
    total = max([max(ready), max(late), *(i.end for i in out)] if out else [0.0])
    return Timeline(tuple(out), total, devices)
