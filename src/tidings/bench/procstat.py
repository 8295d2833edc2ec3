"""The hub's and the loader's memory and CPU, read from `/proc` (so these need Linux)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource

__all__ = ["RssSampler", "cpu_s", "loader_cpu_s", "raise_fd_limit", "rss_kb", "wait_s"]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise ProcessLookupError(pid)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def wait_s(pid: int | str) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat field 2):
    how much other processes on the machine held it back. 0 where unavailable."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), open(
                    f"/proc/{pid}/task/{task}/schedstat", "rb") as stat:
                total += int(stat.read().split()[1])
    return total / 1e9


def loader_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


class RssSampler:
    """Peak RSS of the hub, sampled every 100 ms while the run lasts."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = rss_kb(pid)

    def sample(self) -> int:
        rss = rss_kb(self.pid)
        self.peak_kb = max(self.peak_kb, rss)
        return rss

    async def run(self) -> None:
        with contextlib.suppress(OSError, ProcessLookupError):
            while True:
                self.sample()
                await asyncio.sleep(0.1)
