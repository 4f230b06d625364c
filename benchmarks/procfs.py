"""Reads process trees, their memory and CPU time, and per-core busy time from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses, so split after its last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """The root PID and every live descendant (agent, engine, workers...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        if Path(f"/proc/{pid}").exists():
            tree.append(pid)
            pending.extend(children.get(pid, []))
    return tree


def rss_kb(pid: int) -> int:
    """VmRSS of one process in KiB; 0 if it is gone or a zombie."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(root: int) -> int:
    """Summed VmRSS of the tree (pages shared between processes count once per process)."""
    return sum(rss_kb(pid) for pid in process_tree(root))


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by the live processes of the tree."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # Fields 14 and 15 of /proc/PID/stat (utime, stime), counted from 3 after the name.
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


@dataclass(frozen=True)
class CoreUsage:
    """Seconds one core spent on tasks (user+nice+system), interrupts, hypervisor steal, in total."""

    tasks: float
    interrupts: float
    steal: float
    total: float

    def percent(self, seconds: float) -> float:
        return 100 * seconds / self.total if self.total else 0.0


@dataclass(frozen=True)
class CoreTimes:
    """The jiffy counters of every core at one instant, from /proc/stat."""

    counters: dict[int, tuple[int, ...]]

    @staticmethod
    def read() -> CoreTimes:
        counters = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                # user nice system idle iowait irq softirq steal (guest time is already inside user)
                counters[int(name[3:])] = tuple(int(v) for v in values[:8])
        return CoreTimes(counters)

    def since(self, earlier: CoreTimes, core: int) -> CoreUsage:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            (now - then) / CLOCK_TICKS
            for now, then in zip(self.counters[core], earlier.counters[core])
        )
        # Loopback packet processing runs in softirq, not in any task's own CPU time, so it is kept apart.
        return CoreUsage(
            tasks=user + nice + system,
            interrupts=irq + softirq,
            steal=steal,
            total=user + nice + system + idle + iowait + irq + softirq + steal,
        )
