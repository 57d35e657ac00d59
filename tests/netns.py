"""A cluster of N nodes on this machine, each a network namespace with its own hostname and address.

Node i is ``node<i>`` at 10.231.<net>.<10+i>/24: a network namespace joined by a veth to a bridge
that lives in a switch namespace of its own, so nothing is added to the machine's own network and
no traffic leaves the namespaces. Each node also gets a UTS namespace (its hostname) and a mount
namespace whose /etc/hosts is a bind-mounted file naming every node; the filesystem is otherwise
shared, as a cluster's storage is. A holder process (``sleep``) keeps each node's namespaces; every
command runs in them with ``nsenter`` (not ``ip netns exec``, which remounts /sys, and slurmd then
fails on cgroups).

Faults: a node's link down/up (a partition), SIGSTOP/SIGCONT/SIGKILL of every process on a node.
Teardown kills every process in the nodes' namespaces (ours by construction: nothing else runs
there) and deletes the namespaces. Needs root, ``ip``, ``nsenter`` and ``unshare``; ``NetnsCluster
.unavailable()`` says why not otherwise, and the tests skip with that reason.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "de"  # namespaces: de<pid>-sw (the bridge), de<pid>-n<i> (the nodes)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def pids_in_netns(inode: int) -> list[int]:
    """Every process whose network namespace is ``inode``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == f"net:[{inode}]":
                    out.append(int(entry))
            except OSError:
                pass
    return out


def remove_stale() -> None:
    """Namespaces left by a test session that died without its teardown (its pid is gone)."""
    names = _ip("netns", "list", check=False).stdout.split()
    for name in names:
        m = re.fullmatch(rf"{PREFIX}(\d+)-(sw|n\d+)", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            inode = _netns_inode(name)
            for pid in pids_in_netns(inode) if inode else []:
                _kill(pid, signal.SIGKILL)
            _ip("netns", "del", name, check=False)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Node:
    def __init__(self, cluster: "NetnsCluster", index: int):
        self.index = index
        self.host = f"node{index}"
        self.netns = f"{cluster.tag}-n{index}"
        self.addr = f"10.231.{cluster.net}.{10 + index}"
        self.veth = f"{cluster.tag}v{index}"[-15:]  # the switch side of the node's cable
        self.holder: subprocess.Popen | None = None

    @property
    def inode(self) -> int | None:
        return _netns_inode(self.netns)

    def __repr__(self) -> str:
        return f"{self.host}({self.addr})"


class NetnsCluster:
    def __init__(self, n: int, root: Path):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.net = os.getpid() % 200 + 20  # 10.231.<net>.0/24: only inside our namespaces
        self.root = Path(root)
        self.switch = f"{self.tag}-sw"
        self.nodes = [Node(self, i) for i in range(n)]
        self.hosts = self.root / "hosts"

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here (None: they can)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        missing = [x for x in ("ip", "nsenter", "unshare") if not shutil.which(x)]
        if missing:
            return f"missing {', '.join(missing)} (iproute2, util-linux)"
        probe = f"{PREFIX}{os.getpid()}-probe"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode:
            return f"cannot create a network namespace: {r.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return None

    # -- building and tearing down ----------------------------------------------------------------

    def start(self) -> "NetnsCluster":
        remove_stale()
        self.root.mkdir(parents=True, exist_ok=True)
        # the IPv4-mapped forms too: torch's store listens on IPv6 and looks its clients up by those
        # (a miss falls through to DNS, unreachable from here, and c10d warns)
        lines = ["127.0.0.1 localhost"] + [f"{n.addr} {n.host}\n::ffff:{n.addr} {n.host}" for n in self.nodes]
        self.hosts.write_text("\n".join(lines) + "\n")
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for node in self.nodes:
                _ip("netns", "add", node.netns)
                _ip("-n", self.switch, "link", "add", node.veth, "type", "veth", "peer", "name", "eth0",
                    "netns", node.netns)
                _ip("-n", self.switch, "link", "set", node.veth, "master", "br0", "up")
                _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
                _ip("-n", node.netns, "link", "set", "eth0", "up")
                _ip("-n", node.netns, "link", "set", "lo", "up")
                node.holder = subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount",
                     "--propagation", "private", "--", "sh", "-c",
                     f"hostname {node.host} && mount --bind {self.hosts} /etc/hosts && echo up && exec sleep 86400"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
                if node.holder.stdout.readline().strip() != "up":
                    raise RuntimeError(f"{node.host}: {node.holder.stderr.read().strip()}")
            for node in self.nodes[1:]:  # the bridge forwards (a few seconds of ARP/STP at most)
                self._wait_reachable(self.nodes[0], node)
        except Exception:
            self.close()
            raise
        return self

    def _wait_reachable(self, a: Node, b: Node, timeout: float = 20) -> None:
        """Until a connection attempt from a to b is refused (b answered) rather than timing out."""
        probe = f"import socket; s=socket.socket(); s.settimeout(1); print(s.connect_ex(('{b.addr}', 9)))"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.run(a, ["python3", "-c", probe], check=False).stdout.strip() == "111":  # ECONNREFUSED
                return
            time.sleep(0.2)
        raise RuntimeError(f"{b} is not reachable from {a}")

    def close(self) -> None:
        for node in self.nodes:
            inode = node.inode
            for pid in pids_in_netns(inode) if inode else []:
                _kill(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL too, but be plain about it
                _kill(pid, signal.SIGKILL)
            if node.holder is not None and node.holder.poll() is None:
                node.holder.kill()
            if node.holder is not None:
                node.holder.wait()
                node.holder.stdout.close()
                node.holder.stderr.close()
        for node in self.nodes:
            deadline = time.time() + 10
            while node.inode and pids_in_netns(node.inode) and time.time() < deadline:
                time.sleep(0.05)
            _ip("netns", "del", node.netns, check=False)
        _ip("netns", "del", self.switch, check=False)

    # -- running things on a node -----------------------------------------------------------------

    def command(self, node: Node, cmd: list[str], cwd: str | os.PathLike | None = None) -> list[str]:
        """``cmd`` as it runs on ``node``: in its network, hostname and mount (/etc/hosts) namespaces."""
        return ["nsenter", "-t", str(node.holder.pid), "-n", "-u", "-m", f"--wd={cwd or os.getcwd()}", "--",
                *map(str, cmd)]

    def popen(self, node: Node, cmd: list, cwd=None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(node, cmd, cwd), **kw)

    def run(self, node: Node, cmd: list, cwd=None, check: bool = True, timeout: float = 120,
            **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.command(node, cmd, cwd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode:
            raise RuntimeError(f"{node.host}: {cmd}: {r.stderr[-2000:]}")
        return r

    # -- faults -----------------------------------------------------------------------------------

    def processes(self, node: Node) -> list[int]:
        """Every process on ``node`` but its namespace holder."""
        inode = node.inode
        return [p for p in (pids_in_netns(inode) if inode else []) if p != node.holder.pid]

    def matching(self, node: Node, *texts: str) -> set[int]:
        """The processes on ``node`` whose command line contains any of ``texts``."""
        out = set()
        for pid in self.processes(node):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(t in cmdline for t in texts):
                out.add(pid)
        return out

    def signal_node(self, node: Node, sig: int, only: set[int] | None = None) -> list[int]:
        """Send ``sig`` to every process on ``node`` (or those of them in ``only``)."""
        pids = [p for p in self.processes(node) if only is None or p in only]
        for pid in pids:
            _kill(pid, sig)
        return pids

    def link(self, node: Node, up: bool) -> None:
        """Cut (or restore) the node's cable at the switch: a partition, both sides alive."""
        _ip("-n", self.switch, "link", "set", node.veth, "up" if up else "down")


class Console:
    """A process whose stderr (and stdout) lines are kept with the time each arrived, read by a thread."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.proc, self.lines = proc, []  # (monotonic time, text)
        self.threads = [threading.Thread(target=self._read, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)
                        if s is not None]
        for t in self.threads:
            t.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float, after: float = 0.0) -> float:
        """The time the first line matching ``pattern`` (a regex) arrived (after ``after``);
        TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if t >= after and re.search(pattern, line):
                    return t
            time.sleep(0.05)
        raise TimeoutError(f"no line matching {pattern!r} in {timeout} s:\n{self.text()[-3000:]}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=10)
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in list(self.lines))

    def ours(self) -> list[str]:
        """The lines of the launcher itself (``dist-embed: ...``)."""
        return [line for _, line in list(self.lines) if line.startswith("dist-embed:")]
