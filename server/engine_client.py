"""The API process's handle on the engine: send requests and aborts, stream their outputs back.

The engine loop (engine/process.py) runs either in its own process (production) or in a thread
of this process (tests); both talk over the same multiprocessing Pipe, so the code path is one.
A reader thread blocks on the pipe and hands each message to the asyncio loop; the event loop
never blocks on the engine. No torch is imported here.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
from collections.abc import AsyncIterator

from engine.config import EngineConfig
from engine.messages import (
    AbortRequest,
    AddRequest,
    EngineError,
    EngineInfo,
    EngineStats,
    RequestOutput,
    Shutdown,
    StepOutputs,
)


class EngineDead(RuntimeError):
    """The engine process is gone; requests get 503."""


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound; requests get 429."""


def _engine_main(config: EngineConfig, conn) -> None:  # runs in the child process or thread
    from engine.process import run_engine

    run_engine(config, conn)


class EngineClient:
    def __init__(self, config: EngineConfig, in_process: bool = False) -> None:
        self.config = config
        self.in_process = in_process
        self.info: EngineInfo | None = None
        self.stats = EngineStats(0, 0, 0, 0)
        self.dead: str | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._conn = None
        self._worker: mp.Process | threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats_listeners: list = []

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, timeout: float = 600.0) -> EngineInfo:
        self._loop = asyncio.get_running_loop()
        parent, child = mp.Pipe(duplex=True)
        if self.in_process:
            self._worker = threading.Thread(target=_engine_main, args=(self.config, child), daemon=True)
        else:
            self._worker = mp.get_context("spawn").Process(
                target=_engine_main, args=(self.config, child), daemon=True, name="dspark-engine")
        self._worker.start()
        self._conn = parent
        first = await asyncio.wait_for(asyncio.to_thread(self._recv_first), timeout)
        if isinstance(first, EngineError):
            self.dead = first.message
            raise EngineDead(first.message)
        self.info = first
        self.stats = EngineStats(0, 0, first.kv_blocks_total, first.kv_blocks_total)
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="engine-reader")
        self._reader.start()
        return first

    def _recv_first(self):
        try:
            return self._conn.recv()
        except EOFError:
            return EngineError("engine exited before it was ready")

    async def shutdown(self) -> None:
        if self._conn is not None and self.dead is None:
            try:
                self._conn.send(Shutdown())
            except (OSError, BrokenPipeError):
                pass
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join, 10)
            if isinstance(self._worker, mp.Process) and self._worker.is_alive():
                self._worker.kill()
        self.dead = self.dead or "engine shut down"

    # ---- requests --------------------------------------------------------------------------
    def on_stats(self, callback) -> None:
        """callback(StepOutputs) runs on the event loop after every engine step."""
        self._stats_listeners.append(callback)

    async def generate(self, request: AddRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request; yields its outputs until one has a finish_reason.

        Raises QueueFull before yielding anything when the engine rejects it, EngineDead if the
        engine is gone. If the consumer stops early (client gone), the request is aborted.
        """
        if self.dead is not None:
            raise EngineDead(self.dead)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = queue
        finished = False
        try:
            self._send(request)
            while True:
                item = await queue.get()
                if isinstance(item, EngineDead):
                    raise item
                if item.finish_reason == "rejected":
                    finished = True
                    raise QueueFull(item.error or "the engine's waiting queue is full")
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished and self.dead is None:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Best effort: a dead engine has nothing left to abort."""
        if self.dead is None:
            try:
                self._send(AbortRequest(request_id))
            except EngineDead:
                pass

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except (OSError, BrokenPipeError) as exc:
            raise EngineDead(f"engine pipe closed: {exc}") from exc

    # ---- reader thread ---------------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = EngineError("engine process exited")
            try:
                self._loop.call_soon_threadsafe(self._dispatch, message)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                return
            if isinstance(message, EngineError):
                return

    def _dispatch(self, message) -> None:
        if isinstance(message, EngineError):
            self.dead = self.dead or message.message
            for queue in self._streams.values():
                queue.put_nowait(EngineDead(message.message))
            return
        if isinstance(message, StepOutputs):
            self.stats = message.stats
            for out in message.outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            for callback in self._stats_listeners:
                callback(message)
