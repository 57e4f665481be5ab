"""The scheduler process: confidence snapshots in, capacities out (DSPARK.md §5, production).

The engine sends each round's calibrated prefix survival a [R, γ] and never waits; the process
answers with the capacity K and whether drafting pays at all, for every forward size of other
tokens X in OTHER_GRID (capacities_and_drafting in scheduler/allocate.py, given the round's
measured drafting time). The engine applies the answer two rounds later (scheduler/policy.py),
reading the entry of its own round's X. When the process falls behind it answers only the
newest snapshot it holds, so it catches up instead of queueing stale work.

Started with the standard library's subprocess (`python -m scheduler.process`), not
multiprocessing.Process: the engine itself runs in a daemonic multiprocessing process
(server/engine_client.py) and multiprocessing refuses daemonic processes children. The two ends
are multiprocessing.connection.Connection objects over a Unix socketpair (local only), and only
raw bytes cross it, never pickles:
    engine -> scheduler   snapshot  <q round, i R, i γ, i n, d draft seconds, d β> then R·γ float32
                                    values of a, row-major, then n float32 factors on the
                                    curve's steps/s, measured while serving, as is β, the
                                    seconds a verified draft adds beyond the curve's token
                                    (scheduler/live_curve.py; n = 0: the curve as profiled)
                          stop      the same header with round = -1 and no values
    scheduler -> engine   answer    <q round, d seconds the solve took> then G int64 K and
                                    G bools "drafting pays", one per X of OTHER_GRID
The throughput curve goes to the child once, as JSON on its command line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from scheduler.allocate import OTHER_GRID, capacities_and_drafting, grid_index
from scheduler.throughput import ThroughputCurve

SNAPSHOT = struct.Struct("<qiiidd")  # round, R, γ, n curve factors, draft seconds, β
GRID = len(OTHER_GRID)
ANSWER = struct.Struct(f"<qd{GRID}q{GRID}?")  # round, solve seconds, K per X, pays per X
STOP_ROUND = -1
# what a dead or unreachable scheduler looks like from the engine's side of the socket
DIED = (OSError, EOFError)


@dataclass(frozen=True)
class Answer:
    round: int  # the round whose snapshot K was computed from
    solve_seconds: float
    capacities: tuple[int, ...]  # [G] K: drafted tokens to admit, for each X of OTHER_GRID
    pays: tuple[bool, ...]  # [G] drafting pays there: max_m Θ_m beats plain decoding

    def capacity(self, other: int = 0) -> int:
        """K for a round whose forward holds X = `other` tokens besides the drafting rows'."""
        return self.capacities[grid_index(other)]

    def drafts(self, other: int = 0) -> bool:
        return self.pays[grid_index(other)]

    def encode(self) -> bytes:
        return ANSWER.pack(self.round, self.solve_seconds, *self.capacities, *self.pays)

    @classmethod
    def decode(cls, data: bytes) -> Answer:
        fields = ANSWER.unpack(data)
        return cls(fields[0], fields[1], fields[2:2 + GRID], fields[2 + GRID:])


@dataclass(frozen=True)
class Snapshot:
    round: int
    survival: np.ndarray  # [R, γ] a
    draft_seconds: float = 0.0  # d
    factors: np.ndarray | None = None  # [n] on the curve's steps/s (None: as profiled)
    per_draft: float = 0.0  # β

    def encode(self) -> bytes:
        a = np.ascontiguousarray(self.survival, dtype=np.float32)
        f = np.asarray(() if self.factors is None else self.factors, dtype=np.float32)
        return (SNAPSHOT.pack(self.round, a.shape[0], a.shape[1], f.size, self.draft_seconds,
                              self.per_draft) + a.tobytes() + f.tobytes())

    @classmethod
    def decode(cls, data: bytes) -> Snapshot:
        """Checks the payload length against the header."""
        round_index, r, g, n, d, beta = SNAPSHOT.unpack_from(data)
        payload = memoryview(data)[SNAPSHOT.size:]
        if min(r, g, n) < 0 or len(payload) != 4 * (r * g + n) or not (d >= 0 and beta >= 0):
            raise ValueError(f"malformed snapshot: header says {r}x{g} + {n}, payload "
                             f"{len(payload)} bytes, d {d}, beta {beta}")
        values = np.frombuffer(payload, dtype=np.float32).astype(np.float64)
        return cls(round_index, values[:r * g].reshape(r, g), d, values[r * g:] if n else None,
                   beta)

    def curve(self, profiled: ThroughputCurve) -> ThroughputCurve:
        ok = self.factors is not None and self.factors.size == len(profiled.sizes)
        return profiled.scaled(self.factors) if ok else profiled


def newest_snapshot(conn: Connection) -> bytes | None:
    """Block for one message, then drain whatever else arrived; -> the newest (None on EOF)."""
    try:
        data = conn.recv_bytes()
        while conn.poll(0):
            data = conn.recv_bytes()
    except EOFError:
        return None
    return data


def serve(conn: Connection, curve: ThroughputCurve) -> None:
    """The child's loop: answer the newest snapshot until told to stop or the engine goes away."""
    while (data := newest_snapshot(conn)) is not None:
        snap = Snapshot.decode(data)
        if snap.round == STOP_ROUND:
            return
        start = time.perf_counter()
        ks, pays = capacities_and_drafting(np.clip(snap.survival, 0.0, 1.0), snap.curve(curve),
                                           OTHER_GRID, snap.draft_seconds, snap.per_draft)
        conn.send_bytes(Answer(snap.round, time.perf_counter() - start, tuple(ks.tolist()),
                               tuple(pays.tolist())).encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the DSpark scheduler process (started by the engine)")
    p.add_argument("--fd", type=int, required=True, help="inherited socket to the engine")
    p.add_argument("--curve", required=True, help="the throughput curve as JSON")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    conn = Connection(args.fd)
    try:
        serve(conn, ThroughputCurve.from_dict(json.loads(args.curve)))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the engine went away
    finally:
        conn.close()
    return 0


class SchedulerProcess:
    """The engine's handle on one scheduler child: start, send, receive, stop. Never blocks on
    the child: sends are skipped while more than max_in_flight_bytes of snapshots are
    unanswered, far below the socket's buffer, so a stalled child cannot stall the engine.
    Raises one of DIED when the child is gone."""

    def __init__(self, curve: ThroughputCurve, max_in_flight_bytes: int = 1 << 16) -> None:
        self.curve = curve
        self.max_in_flight_bytes = max_in_flight_bytes
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._in_flight: dict[int, int] = {}  # round -> bytes of its unanswered snapshot
        self.start()

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])  # the folder holding scheduler/
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler.process", "--fd", str(theirs.fileno()),
                 "--curve", json.dumps(self.curve.to_dict())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()  # the child holds its own copy; ours must go so EOF can reach us
        self._conn = Connection(ours.detach())
        self._in_flight = {}

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def send(self, round_index: int, survival: np.ndarray, draft_seconds: float = 0.0,
             factors: np.ndarray | None = None, per_draft: float = 0.0) -> bool:
        """Queue a snapshot for the child; False when skipped because too much is unanswered."""
        data = Snapshot(round_index, survival, draft_seconds, factors, per_draft).encode()
        if self._in_flight and sum(self._in_flight.values()) + len(data) > self.max_in_flight_bytes:
            return False
        self._conn.send_bytes(data)
        self._in_flight[round_index] = len(data)
        return True

    def receive(self, timeout: float = 0.0) -> list[Answer]:
        """Every answer that has arrived (waiting at most `timeout` for the first)."""
        out = []
        while self._conn.poll(timeout):
            answer = Answer.decode(self._conn.recv_bytes())
            # the child answers only its newest snapshot: older ones will never be answered
            self._in_flight = {r: n for r, n in self._in_flight.items() if r > answer.round}
            out.append(answer)
            timeout = 0.0
        return out

    def close(self, timeout: float = 2.0) -> None:
        """Ask the child to stop, then make sure it has (kill after `timeout`)."""
        if self._conn is not None:
            try:
                self._conn.send_bytes(Snapshot(STOP_ROUND, np.zeros((0, 0))).encode())
            except DIED:
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def restart(self) -> None:
        self.close(timeout=0.5)
        self.start()


if __name__ == "__main__":
    sys.exit(main())
