"""The engine process loop: read requests and aborts from the pipe, step, send outputs back.

Started by server/engine_client.py (in a child process, or a thread in tests). The first message
sent is EngineInfo, or EngineError if the engine could not start. Every add is answered at once
(an ack with no tokens, or a rejection) so the API process can turn a full queue into a 429
before it starts a stream. When there is no work the loop blocks on the pipe; it never sleeps.
"""
from __future__ import annotations

import logging
import traceback

from engine.config import EngineConfig
from engine.messages import (
    AbortRequest,
    AddRequest,
    EngineError,
    RequestOutput,
    Shutdown,
    StepOutputs,
)


def run_engine(config: EngineConfig, conn) -> None:
    # a spawned process starts with logging unconfigured: its start-up news (the throughput
    # profile, the drafter) must reach the server's log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        from engine.core import EngineCore

        core = EngineCore.from_config(config)
    except Exception as exc:  # noqa: BLE001 - reported to the API process, which exits cleanly
        conn.send(EngineError(f"engine failed to start: {exc}"))
        conn.close()
        return
    conn.send(core.info())
    try:
        serve(core, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the API process went away: nothing left to serve
    except Exception:  # noqa: BLE001 - a bug in a step: tell the API process, then exit
        conn.send(EngineError("engine step failed:\n" + traceback.format_exc(limit=8)))
    finally:
        core.close()
        conn.close()


def serve(core, conn) -> None:
    while True:
        replies: list[RequestOutput] = []
        if not core.has_work or conn.poll():
            message = conn.recv()  # blocks only when idle
            while True:
                if isinstance(message, Shutdown):
                    return
                replies.extend(handle(core, message))
                if not conn.poll():
                    break
                message = conn.recv()
        if replies:
            conn.send(StepOutputs(tuple(replies), core.stats()))
        if core.has_work:
            outputs = core.step()
            conn.send(StepOutputs(tuple(outputs), core.stats()))


def handle(core, message) -> list[RequestOutput]:
    if isinstance(message, AddRequest):
        return [core.add(message)]
    if isinstance(message, AbortRequest):
        out = core.abort(message.request_id)
        return [out] if out is not None else []
    raise TypeError(f"unexpected message {type(message).__name__}")
