"""The launchers' control channel for a job on several nodes: rendezvous by generations, heartbeats,
and one verdict for the whole job when a node is lost.

Node 0's launcher (the coordinator) listens on --master-port; every other node's launcher (a member)
keeps one TCP connection to it, carrying JSON lines and nothing else. The workers' own connections
(gloo, NCCL) block inside collectives for the process group's timeout (30 minutes by default); this
one never blocks, so:

* a node whose processes die closes its connection: the coordinator knows at once;
* a node cut off or frozen stops its heartbeats (both ways, every ``period`` s): after ``window`` s
  (``distributed.peer_timeout_s``) each side gives the other up, on both sides of a partition;
* the coordinator decides for the job (the first failure or loss it hears of) and tells every
  member (``abort``), so every node stops its workers and says the same thing.

A generation is one start of the workers on every node. The coordinator opens it once every node
has said ``hello`` (within ``distributed.join_timeout_s``) and answers ``go`` with the process
group's port and the workers' ``--resume``. A launcher says ``hello`` for the next generation only
after its workers of the last one are gone, so two generations never run at once: a frozen node's
workers, continued, find their group gone and are stopped before their node joins again.
"""
from __future__ import annotations

import json
import select
import socket
import time
from dataclasses import dataclass

from dist_embed.exit_codes import EXIT_PEER_LOST


@dataclass
class Verdict:
    """What ended a generation: the exit code it means, and what happened, said for the user."""
    code: int
    why: str
    restart: bool | None = None  # the coordinator's decision (members follow it)
    step: int | None = None


class Unjoined(Exception):
    """The rendezvous did not complete in time (the message names who is missing)."""


class Mismatch(Exception):
    """A node joined with another job's description (e.g. another output_dir): bad input."""


def describe_node(node: int, host: str, nproc: int) -> str:
    first = node * nproc
    ranks = f"rank {first}" if nproc == 1 else f"ranks {first}-{first + nproc - 1}"
    return f"node {node} ({host}, {ranks})"


def heartbeat_period(window: float) -> float:
    return max(0.05, min(1.0, window / 10))


class Link:
    """One TCP connection carrying JSON lines; each message is a dict whose kind is ``t``."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.settimeout(2.0)  # a send to a peer that stopped reading fails instead of hanging
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.heard = time.monotonic()
        self.node: int | None = None
        self.host = ""
        self.open = True
        self.closed_why = ""

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, kind: str, **fields) -> bool:
        if not self.open:
            return False
        try:
            self.sock.sendall(json.dumps({"t": kind, **fields}).encode() + b"\n")
            return True
        except OSError:
            self.close("its connection broke")
            return False

    def receive(self) -> list[dict]:
        """The messages that arrived (call when readable); none, and closed, at the end of the stream."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, socket.timeout):
            return []
        except OSError:
            data = b""
        if not data:
            self.close("its connection closed")
            return []
        self.heard = time.monotonic()
        *lines, self.buf = (self.buf + data).split(b"\n")
        out = []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                out.append(msg)
        return out

    def close(self, why: str = "closed") -> None:
        if self.open:
            self.open, self.closed_why = False, why
            try:
                self.sock.close()
            except OSError:
                pass


def wait_readable(links: list, timeout: float) -> list:
    live = [x for x in links if x is not None and (not isinstance(x, Link) or x.open)]
    if not live:
        time.sleep(timeout)
        return []
    return select.select(live, [], [], timeout)[0]


class Watch:
    """What both roles share: the heartbeat clock and noticing that this process itself was stopped."""

    def __init__(self, window: float):
        self.window, self.period = window, heartbeat_period(window)
        self.ticked = self.sent = time.monotonic()
        self.step = 0

    def stopped_for(self) -> float:
        """Seconds this launcher itself was stopped (SIGSTOP, a frozen VM) if longer than the window."""
        now = time.monotonic()
        gap, self.ticked = now - self.ticked, now
        return gap if gap > self.window else 0.0

    def restart_clock(self) -> None:
        self.ticked = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.sent >= self.period:
            self.sent = now
            return True
        return False


class Coordinator(Watch):
    """Node 0's side: the rendezvous, every member's heartbeat, the job's verdict."""

    def __init__(self, port: int, nnodes: int, nproc: int, window: float, job: str = ""):
        super().__init__(window)
        self.nnodes, self.nproc, self.job = nnodes, nproc, job
        dual = socket.has_dualstack_ipv6()
        self.server = socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                           backlog=64, dualstack_ipv6=dual)
        self.members: dict[int, Link] = {}
        self.fresh: list[Link] = []  # connected, not yet said hello
        self.ready: set[int] = set()  # said hello for the generation being gathered
        self.done: dict[int, int] = {}
        self.gen = -1

    def close(self) -> None:
        for link in [*self.members.values(), *self.fresh]:
            link.close()
        self.server.close()

    def _poll(self, timeout: float) -> list[tuple[int, dict]]:
        """Accept and read; (node, message) for everything members said."""
        out = []
        for x in wait_readable([self.server, *self.fresh, *self.members.values()], timeout):
            if x is self.server:
                try:
                    sock, _ = self.server.accept()
                except OSError:  # the peer gave up before we took the connection
                    continue
                self.fresh.append(Link(sock))
                continue
            for msg in x.receive():
                if msg.get("t") == "hello" and isinstance(msg.get("node"), int) and 0 < msg["node"] < self.nnodes:
                    node = msg["node"]
                    old = self.members.get(node)
                    if old is not None and old is not x:  # a restarted node: its new launcher wins
                        old.close("a new launcher took its place")
                    x.node, x.host = node, str(msg.get("host", "?"))
                    self.members[node] = x
                    if x in self.fresh:
                        self.fresh.remove(x)
                if x.node is not None:
                    out.append((x.node, msg))
        self.fresh = [x for x in self.fresh if x.open]
        return out

    def gather(self, timeout: float, stopping) -> dict[int, str] | None:
        """Wait until every node has said hello for the next generation; their hosts. ``stopping()``
        true: give up (None). After ``timeout`` s: Unjoined naming the missing nodes."""
        self.gen += 1
        self.done = {}
        deadline = time.monotonic() + timeout
        while True:
            for node, msg in self._poll(0.1):
                if msg["t"] == "hello":
                    if msg.get("job", "") != self.job:
                        raise Mismatch(f"node {node} ({self.members[node].host}) runs {msg.get('job')!r}, node 0 runs "
                                       f"{self.job!r}: every node must name the same output_dir, on storage all see")
                    self.ready.add(node)
            self.ready = {n for n in self.ready if self.members.get(n) is not None and self.members[n].open}
            if len(self.ready) == self.nnodes - 1:
                return {n: self.members[n].host for n in self.ready}
            if stopping():
                return None
            if time.monotonic() > deadline:
                missing = [n for n in range(1, self.nnodes) if n not in self.ready]
                raise Unjoined(f"node{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never joined "
                               f"the rendezvous within {timeout:.0f} s")

    def go(self, port: int, resume: str | None) -> None:
        for node in sorted(self.ready):
            self.members[node].send("go", gen=self.gen, port=port, resume=resume)
        self.ready = set()  # from now on a hello is for the next generation
        now = time.monotonic()
        for link in self.members.values():
            link.heard = now
        self.restart_clock()

    def check(self) -> Verdict | None:
        """One look at the members while the workers run (never blocks): a verdict, or None."""
        frozen = self.stopped_for()
        if frozen:
            return Verdict(EXIT_PEER_LOST, f"this node ({socket.gethostname()}) was given up by the others: it was "
                                           f"stopped for {frozen:.0f} s")
        for node, msg in self._poll(0):
            if msg["t"] == "hello":  # a node's launcher started again: its old workers are gone
                self.ready.add(node)
                return Verdict(EXIT_PEER_LOST, f"lost {describe_node(node, self.members[node].host, self.nproc)}: "
                                               "its launcher started again")
            if msg["t"] == "hb":
                self.step = max(self.step, int(msg.get("step") or 0))
            elif msg["t"] == "done" and msg.get("gen") == self.gen:
                self.done[node] = int(msg["code"])
            elif msg["t"] == "fail" and msg.get("gen") == self.gen:
                return Verdict(int(msg["code"]), str(msg["why"]))
        if self.due():
            for link in self.members.values():
                link.send("hb", step=self.step)
        now = time.monotonic()
        for node in range(1, self.nnodes):
            link = self.members.get(node)
            if node in self.done:
                continue
            who = describe_node(node, link.host if link else "?", self.nproc)
            if link is None or not link.open:
                return Verdict(EXIT_PEER_LOST, f"lost {who}: {link.closed_why if link else 'never joined'}")
            if now - link.heard > self.window:
                return Verdict(EXIT_PEER_LOST, f"lost {who}: no heartbeat for {now - link.heard:.0f} s")
        return None

    def abort(self, verdict: Verdict) -> None:
        for link in self.members.values():
            link.send("abort", gen=self.gen, code=verdict.code, why=verdict.why, restart=bool(verdict.restart),
                      step=verdict.step)

    def await_done(self, timeout: float) -> None:
        """After this node's workers finished: let every member say so too (a bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n in self.done or not (self.members.get(n) and self.members[n].open) for n in range(1, self.nnodes)):
                return
            for node, msg in self._poll(0.1):
                if msg["t"] == "done":
                    self.done[node] = int(msg["code"])


class Member(Watch):
    """Node r's side (r > 0): joins each generation at the coordinator, heartbeats, obeys its verdict."""

    def __init__(self, addr: str, port: int, node: int, nproc: int, window: float, job: str = ""):
        super().__init__(window)
        self.addr, self.port, self.node, self.nproc, self.job = addr, port, node, nproc, job
        self.link: Link | None = None
        self.gen = -1
        self.coordinator = describe_node(0, addr, nproc)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    def _connect(self, deadline: float, timeout: float, stopping) -> None:
        while self.link is None or not self.link.open:
            if stopping():
                return
            try:
                sock = socket.create_connection((self.addr, self.port), timeout=max(0.2, min(2.0, self.window / 2)))
                self.link = Link(sock)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise Unjoined(f"node {self.node} could not reach the rendezvous at {self.addr}:{self.port} "
                                   f"within {timeout:.0f} s")
                time.sleep(0.2)

    def join(self, timeout: float, stopping) -> dict | None:
        """Say hello and wait for the coordinator's answer: ``go`` (or ``abort``: the job ended
        before it could start again). None if ``stopping()``; Unjoined after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            self._connect(deadline, timeout, stopping)
            if stopping():
                return None
            if self.link.send("hello", node=self.node, host=socket.gethostname(), job=self.job):
                while self.link.open:
                    for msg in self.link.receive() if wait_readable([self.link], 0.1) else []:
                        if msg.get("t") == "go" or (msg.get("t") == "abort" and int(msg.get("gen", -1)) > self.gen):
                            self.gen = int(msg["gen"])
                            self.restart_clock()
                            self.link.heard = time.monotonic()
                            return msg
                    if stopping():
                        return None
                    if time.monotonic() > deadline:
                        raise Unjoined(f"the rendezvous at {self.addr}:{self.port} did not start the job within "
                                       f"{timeout:.0f} s")
            self.link = None  # the coordinator went away while we waited: a new one may come up

    def check(self) -> Verdict | None:
        frozen = self.stopped_for()
        if frozen:
            self.close()
            return Verdict(EXIT_PEER_LOST, f"this node ({socket.gethostname()}) was given up by the others: it was "
                                           f"stopped for {frozen:.0f} s")
        for msg in self.link.receive() if wait_readable([self.link], 0) else []:
            if msg.get("t") == "hb":
                self.step = max(self.step, int(msg.get("step") or 0))
            elif msg.get("t") == "abort" and msg.get("gen") == self.gen:
                return Verdict(int(msg["code"]), str(msg["why"]), bool(msg.get("restart")), msg.get("step"))
        if self.due():
            self.link.send("hb", step=self.step)
        if not self.link.open:
            return Verdict(EXIT_PEER_LOST, f"lost contact with {self.coordinator}: {self.link.closed_why}")
        silent = time.monotonic() - self.link.heard
        if silent > self.window:
            self.close()
            return Verdict(EXIT_PEER_LOST, f"lost contact with {self.coordinator}: no heartbeat for {silent:.0f} s")
        return None

    def report(self, kind: str, code: int, why: str = "") -> None:
        if self.link is not None:
            self.link.send(kind, gen=self.gen, code=code, why=why)

    def await_verdict(self, timeout: float) -> Verdict | None:
        """After reporting a failure here: the coordinator's decision for the job (None: it is gone)."""
        deadline = time.monotonic() + timeout
        while self.link is not None and self.link.open and time.monotonic() < deadline:
            for msg in self.link.receive() if wait_readable([self.link], 0.1) else []:
                if msg.get("t") == "abort" and msg.get("gen") == self.gen:
                    return Verdict(int(msg["code"]), str(msg["why"]), bool(msg.get("restart")), msg.get("step"))
        return None
