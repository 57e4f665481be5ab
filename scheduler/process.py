"""The scheduler process: confidence snapshots in, capacities out (DSPARK.md §5, production).

The engine sends each round's calibrated prefix survival a [R, γ] and never waits; the process
answers with the capacity K and whether drafting pays at all (capacity_and_drafting in
scheduler/allocate.py, given the round's measured drafting time), which the engine applies two
rounds later (scheduler/policy.py). When the process falls behind it answers only the
newest snapshot it holds, so it catches up instead of queueing stale work.

Started with the standard library's subprocess (`python -m scheduler.process`), not
multiprocessing.Process: the engine itself runs in a daemonic multiprocessing process
(server/engine_client.py) and multiprocessing refuses daemonic processes children. The two ends
are multiprocessing.connection.Connection objects over a Unix socketpair (local only), and only
raw bytes cross it, never pickles:
    engine -> scheduler   snapshot  <q round, i R, i γ, i X, d draft seconds> then R·γ float32
                                    values of a, row-major (X: the forward's other tokens)
                          stop      the same header with round = -1 and no values
    scheduler -> engine   answer    <q round, q K, d seconds the solve took, ? drafting pays>
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

from scheduler.allocate import capacity_and_drafting
from scheduler.throughput import ThroughputCurve

SNAPSHOT = struct.Struct("<qiiid")  # round, R, γ, X (other tokens in the forward), draft seconds
ANSWER = struct.Struct("<qqd?")  # round, K, solve seconds, drafting pays
STOP_ROUND = -1
# what a dead or unreachable scheduler looks like from the engine's side of the socket
DIED = (OSError, EOFError)


@dataclass(frozen=True)
class Answer:
    round: int  # the round whose snapshot K was computed from
    capacity: int  # K: drafted tokens to admit
    solve_seconds: float
    drafts: bool = True  # drafting pays: max_m Θ_m beats plain decoding


def encode_snapshot(round_index: int, survival: np.ndarray, other: int = 0,
                    draft_seconds: float = 0.0) -> bytes:
    """survival: [R, γ], other: X, draft_seconds: d -> header + float32 payload."""
    a = np.ascontiguousarray(survival, dtype=np.float32)
    return SNAPSHOT.pack(round_index, a.shape[0], a.shape[1], other, draft_seconds) + a.tobytes()


def decode_snapshot(data: bytes) -> tuple[int, np.ndarray, int, float]:
    """-> (round, a [R, γ] float64, X, d); checks the payload length against the header."""
    round_index, r, g, other, draft_seconds = SNAPSHOT.unpack_from(data)
    payload = memoryview(data)[SNAPSHOT.size:]
    if r < 0 or g < 0 or other < 0 or len(payload) != 4 * r * g or not draft_seconds >= 0:
        raise ValueError(f"malformed snapshot: header says {r}x{g}, payload {len(payload)} bytes, "
                         f"draft seconds {draft_seconds}")
    a = np.frombuffer(payload, dtype=np.float32).reshape(r, g).astype(np.float64)
    return round_index, a, other, draft_seconds


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
        round_index, survival, other, draft_seconds = decode_snapshot(data)
        if round_index == STOP_ROUND:
            return
        start = time.perf_counter()
        capacity, drafts = capacity_and_drafting(np.clip(survival, 0.0, 1.0), curve, other,
                                                 draft_seconds)
        conn.send_bytes(ANSWER.pack(round_index, capacity, time.perf_counter() - start, drafts))


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

    def send(self, round_index: int, survival: np.ndarray, other: int = 0,
             draft_seconds: float = 0.0) -> bool:
        """Queue a snapshot for the child; False when skipped because too much is unanswered."""
        data = encode_snapshot(round_index, survival, other, draft_seconds)
        if self._in_flight and sum(self._in_flight.values()) + len(data) > self.max_in_flight_bytes:
            return False
        self._conn.send_bytes(data)
        self._in_flight[round_index] = len(data)
        return True

    def receive(self, timeout: float = 0.0) -> list[Answer]:
        """Every answer that has arrived (waiting at most `timeout` for the first)."""
        out = []
        while self._conn.poll(timeout):
            answer = Answer(*ANSWER.unpack(self._conn.recv_bytes()))
            # the child answers only its newest snapshot: older ones will never be answered
            self._in_flight = {r: n for r, n in self._in_flight.items() if r > answer.round}
            out.append(answer)
            timeout = 0.0
        return out

    def close(self, timeout: float = 2.0) -> None:
        """Ask the child to stop, then make sure it has (kill after `timeout`)."""
        if self._conn is not None:
            try:
                self._conn.send_bytes(SNAPSHOT.pack(STOP_ROUND, 0, 0, 0, 0.0))
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
