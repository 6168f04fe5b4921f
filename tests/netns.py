"""Two hosts on one machine, for the multi-node tests: network namespaces joined by a veth pair.

``two_hosts()`` makes hosts A (10.77.0.1/24) and B (10.77.0.2/24). Each is

- a network namespace with loopback up and one end of a veth pair, named ``fedrun0`` on both hosts (as every
  node of a cluster has its ``eth0``, so one ``GLOO_SOCKET_IFNAME`` serves every host);
- its own ``/etc/hosts`` naming both hosts and an empty ``resolv.conf`` (``/etc/netns/NAME/*``, bind-mounted over
  ``/etc`` as ``ip netns exec`` does), so ``hosta``/``hostb`` resolve the same everywhere;
- its own hostname: every command runs in UTS and mount namespaces of its own (``unshare``) named after its
  host, so torchrun's agents and slurmd see two machines, as on a cluster.

No default route, no NAT, nothing on the real interfaces: the veth is created inside the namespaces, so a packet
can only reach the other namespace or loopback. Everything is removed on exit, also after a failure; names carry
the pid and a random token, so parallel runs never collide, and namespaces left by a killed run (its pid gone) are
removed by the next one.

Needs root, ``ip`` (iproute2), ``nsenter`` and ``unshare`` (util-linux). ``NamespacesUnavailable`` says why when
they cannot be made. Try it by hand: ``sudo python tests/netns.py`` shows each host's name, addresses and routes,
then removes them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

PREFIX = "fedrun-"
"""Namespace names: ``fedrun-<pid>-<token>-a``; the pid lets a later run tell a crashed run's leftovers."""
IFNAME = "fedrun0"
"""The veth end's name inside each namespace: the GLOO_SOCKET_IFNAME of every host."""
SUBNET = "10.77.0"
ETC_NETNS = Path("/etc/netns")


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, a container without CAP_NET_ADMIN...)."""


@dataclass(frozen=True)
class Host:
    """One host: a network namespace, an address on the veth link, a hostname."""

    hostname: str
    """'hosta' or 'hostb': resolves to ``addr`` on every host."""
    addr: str
    """Its address on the link, e.g. '10.77.0.1'."""
    netns: str
    """The network namespace's name."""

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run on this host: in its network namespace, under its hostname, with its /etc/hosts.

        What ``ip netns exec`` does, less its remount of /sys (that would hide /sys/fs/cgroup, which slurmd needs):
        nsenter, unshare and sh exec the command, so the pid of the process started is the command's own."""
        etc = ETC_NETNS / self.netns
        inner = (
            f"mount --bind {etc}/hosts /etc/hosts && mount --bind {etc}/resolv.conf /etc/resolv.conf"
            ' && hostname "$0" && exec "$@"'
        )
        ns = ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts"]
        return [*ns, "sh", "-c", inner, self.hostname, *cmd]

    def run(self, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.argv(cmd), **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd), **kwargs)


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise NamespacesUnavailable(f"`ip {' '.join(args)}` failed: {(res.stderr or res.stdout).strip()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove the namespaces (and /etc/netns folders) of runs whose process is gone; returns their names."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    names = [line.split()[0] for line in res.stdout.splitlines() if line.startswith(PREFIX)]
    stale = []
    for name in names:
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
            stale.append(name)
    _rmdir_if_empty(ETC_NETNS)
    return stale


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, from what can be seen without making one (None: try)."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the multinode tests as root: sudo python -m pytest -m multinode)"
    for tool, pkg in (("ip", "iproute2"), ("nsenter", "util-linux"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install {pkg}"
    return None


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (another run's, or the system's) or already gone


def kill_inside(netns: str) -> list[int]:
    """SIGKILL every process still in the namespace (all started by this run: the namespace is its own)."""
    res = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    pids = [int(p) for p in res.stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return pids


def _hosts_file(hosts: Sequence[Host]) -> str:
    lines = ["127.0.0.1 localhost", *(f"{h.addr} {h.hostname}" for h in hosts)]
    return "\n".join(lines) + "\n"


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Hosts A and B joined by a veth pair, removed on exit (also after a failure)."""
    why = unavailable_reason()
    if why:
        raise NamespacesUnavailable(why)
    remove_stale()
    token = secrets.token_hex(3)
    a, b = (Host(f"host{x}", f"{SUBNET}.{i}", f"{PREFIX}{os.getpid()}-{token}-{x}") for i, x in ((1, "a"), (2, "b")))
    with ExitStack() as cleanup:
        cleanup.callback(_rmdir_if_empty, ETC_NETNS)  # runs last: after the hosts' folders are gone
        for h in (a, b):
            _ip("netns", "add", h.netns)
            cleanup.callback(subprocess.run, ["ip", "netns", "del", h.netns], capture_output=True, timeout=30)
            cleanup.callback(kill_inside, h.netns)  # first: a namespace lives on while a process is in it
            etc = ETC_NETNS / h.netns
            cleanup.callback(shutil.rmtree, etc, ignore_errors=True)
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(_hosts_file((a, b)))
            (etc / "resolv.conf").write_text("# no DNS on this test host\n")
        # Created inside the namespaces (never on the real host's side); deleting a namespace deletes its end.
        va, vb = f"fr{token}a", f"fr{token}b"
        _ip("link", "add", va, "netns", a.netns, "type", "veth", "peer", "name", vb, "netns", b.netns)
        for h, dev in ((a, va), (b, vb)):
            _ip("-n", h.netns, "link", "set", dev, "name", IFNAME)
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", IFNAME)
            _ip("-n", h.netns, "link", "set", IFNAME, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
        yield a, b


if __name__ == "__main__":
    with two_hosts() as hosts:
        for h in hosts:
            print(h.run(["sh", "-c", "hostname; ip -br addr; ip route; getent hosts hosta hostb"]).stdout)
        print(hosts[0].run(["cat", "/etc/hosts"]).stdout, open("/etc/hosts").read()[:200])
        print(hosts[1].run(["ping", "-c", "1", "-W", "2", "hosta"]).stdout if shutil.which("ping") else "")
