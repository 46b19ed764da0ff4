"""The Ray worker processes of a job, seen from outside through /proc (Linux): which of them ran a shard, whether
torch is loaded in them, and their memory."""

from __future__ import annotations

from pathlib import Path


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d.name))
    return out


def _mib(status: str, key: str) -> float:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ray_workers(root: int) -> dict[int, dict]:
    """{pid: {"torch", "rss_mib", "peak_mib"}} of the Ray workers below process ``root`` that ran a shard.

    A worker that ran a shard has scipy's shared libraries mapped (the matching uses them; Ray itself does not);
    torch is loaded when libtorch is mapped."""
    children, found, stack = _children(), {}, [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                maps = Path(f"/proc/{pid}/maps").read_text()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if (b"ray::" in cmd or b"default_worker.py" in cmd) and "/scipy/" in maps:
                found[pid] = {"torch": "libtorch" in maps, "rss_mib": round(_mib(status, "VmRSS"), 1),
                              "peak_mib": round(_mib(status, "VmHWM"), 1)}
    return found


def loads_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
