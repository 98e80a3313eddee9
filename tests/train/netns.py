"""Several "nodes" on one machine, for the multi-node tests: Linux network namespaces joined by a
veth pair, each with its own address, so a launcher started in one (`Nodes.command`) reaches the
other only across that link, as it would another host.

    with two_nodes() as nodes:              # namespaces mmgpt-<pid>-<n>-{0,1}, 10.77.<n>.{1,2}/24
        subprocess.Popen(nodes.command(1, ["python", ...]))

Every address lives inside a namespace made here; the machine's own interfaces and routes are
never touched. The namespaces share the machine's filesystem (a shared checkpoint folder for
free) and /dev/shm. Leaving the block kills whatever still runs inside the namespaces and deletes
them (deleting one end of the veth pair deletes both); a test process killed before it could do
that leaves namespaces named after its pid, which the next `two_nodes()` removes.
Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's `ip`; `unavailable_reason` says which
is missing.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

PREFIX = "mmgpt"
INTERFACE = "mmgpt-veth"  # the same name at both ends (each in its own namespace), so one GLOO_SOCKET_IFNAME fits all
NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-")  # mmgpt-<pid of the test process that made it>-...
_serial = itertools.count()


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> Optional[str]:
    """Why namespaces cannot be made here (None when they can): checked by making and deleting one."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    probe = f"{PREFIX}-{os.getpid()}-probe-{next(_serial)}"  # its name is swept by remove_stale too
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Nodes:
    namespaces: list[str]
    addresses: list[str]
    interface: str = INTERFACE

    def command(self, node: int, cmd: list[str]) -> list[str]:
        """`cmd` run on node `node` (inside its namespace)."""
        return ["ip", "netns", "exec", self.namespaces[node], *map(str, cmd)]

    def bytes_sent(self, node: int) -> int:
        """Bytes node `node` has sent over the link so far."""
        stats = json.loads(_ip("-n", self.namespaces[node], "-j", "-s", "link", "show", "dev", self.interface).stdout)
        return int(stats[0]["stats64"]["tx"]["bytes"])


def _namespace_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def remove_namespace(ns: str) -> None:
    """SIGKILL what runs inside `ns`, then delete it (and with it its end of the veth pair)."""
    for pid in _namespace_pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _ip("netns", "del", ns, check=False)


def our_namespaces() -> list[str]:
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.strip() and NAME_RE.match(line.split()[0])]


def remove_stale() -> None:
    """Namespaces left by a test process that no longer exists (killed before its clean-up ran)."""
    for ns in our_namespaces():
        pid = int(NAME_RE.match(ns).group(1))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            remove_namespace(ns)


@contextmanager
def two_nodes() -> Iterator[Nodes]:
    remove_stale()
    serial = next(_serial)
    subnet = 10 + serial % 240  # unique per block in this process; namespaces never see each other's anyway
    names = [f"{PREFIX}-{os.getpid()}-{serial}-{n}" for n in range(2)]
    addresses = [f"10.77.{subnet}.{n + 1}" for n in range(2)]
    try:
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", INTERFACE, "netns", names[0], "type", "veth", "peer", "name", INTERFACE, "netns", names[1])
        for ns, address in zip(names, addresses):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", INTERFACE)
            _ip("-n", ns, "link", "set", INTERFACE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # a rank reaches the ranks on its own node through it
        yield Nodes(names, addresses)
    finally:
        for ns in names:
            remove_namespace(ns)
