"""OpenAI-compatible HTTP front end.

One request: body -> pydantic model (400 on anything malformed) -> prompt token ids (chat template
or plain encode) -> length check -> AddRequest -> engine ack (429 when the queue is full, 503 when
the engine is dead) -> outputs -> IncrementalDetokenizer (UTF-8 and stop strings) -> SSE chunks or
one JSON body. Leaving early (stop string, client gone) closes the engine's output generator,
which aborts the engine request.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine.messages import AddRequest, EngineInfo, EngineStats, RequestOutput, SamplingParams
from server.engine_client import EngineDead, QueueFull
from server.metrics import RequestTimer, ServerMetrics
from server.protocol import (UNSUPPORTED, APIError, ChatCompletionRequest, ChatFormat,
                             CompletionFormat, CompletionRequest, usage)
from server.text import ChatTemplateError, IncrementalDetokenizer, TextProcessor

log = logging.getLogger("dspark.server")
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens


class EngineClientLike(Protocol):
    """What the app needs of server.engine_client.EngineClient (tests pass fakes)."""

    info: EngineInfo | None
    stats: EngineStats
    dead: str | None

    def on_stats(self, callback) -> None: ...
    def generate(self, request: AddRequest) -> AsyncGenerator[RequestOutput, None]: ...
    def abort(self, request_id: str) -> None: ...


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


def _sse(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def engine_dead_error(reason: str) -> APIError:
    return APIError(503, f"the engine is not available: {reason}", type="server_error", code="engine_unavailable")


# ---- one running request --------------------------------------------------------------------
class Generation:
    """One engine request as the HTTP layer sees it: its outputs, its text and its accounting."""

    def __init__(self, outputs: AsyncGenerator[RequestOutput, None], first: RequestOutput,
                 detok: IncrementalDetokenizer, timer: RequestTimer, metrics: ServerMetrics,
                 prompt_tokens: int, user: str) -> None:
        self.outputs = outputs
        self.first = first
        self.detok = detok
        self.timer = timer
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.user = user
        self.finish_reason: str | None = None
        self._closed = False

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.detok.num_tokens)

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas until the request finishes. Closing this early (client gone) or stopping
        on a stop string closes the engine generator, whose `finally` aborts the engine request."""
        try:
            if text := self._take(self.first):
                yield text
            if self.finish_reason is None:
                async for out in self.outputs:
                    if text := self._take(out):
                        yield text
                    if self.finish_reason is not None:
                        break
        finally:
            await self.close()

    async def close(self) -> None:
        """End the request once: closing the engine generator aborts the engine request if it
        is still running; the metrics record it as finished ("abort" when it did not finish).
        Also called by whoever started it, for the case where `deltas()` never ran."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.outputs.aclose()
        except EngineDead:  # the abort could not be sent: the engine is gone, nothing runs
            pass
        self.metrics.on_finish(self.timer, prompt_tokens=self.prompt_tokens,
                               completion_tokens=self.detok.num_tokens,
                               finish_reason=self.finish_reason or "abort", user=self.user)

    def _take(self, out: RequestOutput) -> str:
        before = self.detok.num_tokens
        text = self.detok.feed(out.new_token_ids)
        self.metrics.on_tokens(self.timer, self.detok.num_tokens - before)
        if not self.detok.stopped and out.finish_reason is not None:
            text += self.detok.finish()
        if self.detok.stopped:
            self.finish_reason = "stop"
        elif out.finish_reason is not None:
            self.finish_reason = out.finish_reason
        return text


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator and then runs `on_close`, however the response ends. Starlette
    leaves a generator parked at a `yield` (or never started) when the client goes away to the
    garbage collector; closing here aborts the engine request at once."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # a client leaving mid-stream is normal, not a server error
            log.debug("client disconnected mid-stream")
        finally:
            await self.body_iterator.aclose()
            await self._on_close()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run `work` but cancel it if the client disconnects first: a non-streaming client that
    gave up must not keep the engine busy. Returns (finished, result)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


# ---- the OpenAI endpoints -------------------------------------------------------------------
class OpenAIServing:
    """Chat and text completions against one engine client."""

    def __init__(self, client: EngineClientLike, text: TextProcessor, model_name: str,
                 metrics: ServerMetrics) -> None:
        self.client = client
        self.text = text
        self.model_name = model_name
        self.metrics = metrics

    async def chat(self, request: Request) -> Response:
        req = self._parse(await request.body(), ChatCompletionRequest)
        try:
            prompt = self.text.apply_chat_template([m.template_dict() for m in req.messages])
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name, req.include_usage)
        return await self._complete(request, req, prompt, fmt, "messages")

    async def completion(self, request: Request) -> Response:
        req = self._parse(await request.body(), CompletionRequest)
        prompt = req.prompt_text_or_ids()
        ids = self.text.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        vocab = self.client.info.vocab_size
        if max(ids) >= vocab:
            raise APIError(400, f"prompt token ids must be < vocab size {vocab}", param="prompt")
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name, req.include_usage)
        return await self._complete(request, req, ids, fmt, "prompt")

    def _parse(self, raw: bytes, model: type):
        """Body -> request model; every malformed input is a 400 naming the field."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from exc
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model",
                           code="model_not_found")
        return req

    def _sampling(self, req, prompt_len: int, param: str) -> SamplingParams:
        """The engine's sampling params, with the max_tokens policy: a prompt that alone fills
        the context is refused (400 context_length_exceeded); a max_tokens running past the
        context is clamped to what fits (vLLM refuses instead; clamping serves clients that always
        send one large max_tokens); an omitted max_tokens means the rest of the context."""
        limit = self.client.info.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, "
                           f"your prompt has {prompt_len} tokens, leaving no room for a completion.",
                           param=param, code="context_length_exceeded")
        stop_ids = req.stop_token_ids or ()
        if stop_ids and max(stop_ids) >= self.client.info.vocab_size:
            raise APIError(400, "stop_token_ids must be < the vocab size", param="stop_token_ids")
        requested, room = req.requested_max_tokens(), limit - prompt_len
        return req.sampling_params(room if requested is None else min(requested, room))

    async def _complete(self, request: Request, req, prompt: list[int], fmt: ChatFormat,
                        param: str) -> Response:
        params = self._sampling(req, len(prompt), param)
        add = AddRequest(uuid.uuid4().hex, tuple(prompt), params, user=req.user or "",
                         sla_tps=req.sla_tps)
        gen = await self._start(add, req.stop_strings())
        if req.stream:
            return ClosingStreamingResponse(self._stream(gen, fmt), gen.close, media_type="text/event-stream",
                                            headers=_SSE_HEADERS)
        try:
            finished, text = await run_unless_disconnected(request, self._collect(gen))
        finally:
            await gen.close()
        if not finished:  # nobody is listening; the status is for the access log
            return Response(status_code=499)
        return json_response(fmt.full(text, gen.finish_reason, gen.usage()))

    async def _start(self, add: AddRequest, stop: tuple[str, ...]) -> Generation:
        """Submit to the engine and wait for its ack, so a full queue is a real 429 status even
        for a streaming request (the response has not started yet)."""
        timer = RequestTimer()
        outputs = self.client.generate(add)
        try:
            first = await anext(outputs)
        except QueueFull as exc:
            raise APIError(429, f"the server is at capacity, retry later: {exc}", type="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from exc
        except EngineDead as exc:
            raise engine_dead_error(str(exc)) from exc
        except StopAsyncIteration as exc:
            raise engine_dead_error("the engine ended the request without output") from exc
        detok = self.text.detokenizer(add.prompt_token_ids, stop)
        return Generation(outputs, first, detok, timer, self.metrics, len(add.prompt_token_ids), add.user)

    async def _collect(self, gen: Generation) -> str:
        try:
            async with aclosing(gen.deltas()) as deltas:
                return "".join([text async for text in deltas])
        except EngineDead as exc:
            raise engine_dead_error(str(exc)) from exc

    async def _stream(self, gen: Generation, fmt: ChatFormat) -> AsyncIterator[bytes]:
        """SSE body: role chunk (chat), content chunks, finish chunk, usage chunk, [DONE]."""
        try:
            if (first := fmt.first_chunk()) is not None:
                yield _sse(first)
            async with aclosing(gen.deltas()) as deltas:
                async for text in deltas:
                    yield _sse(fmt.delta_chunk(text))
            yield _sse(fmt.final_chunk(gen.finish_reason or "abort"))
            if fmt.include_usage:
                yield _sse(fmt.usage_chunk(gen.usage()))
        except EngineDead as exc:  # the status line is gone; tell the client in the stream
            self.metrics.on_error(503)
            yield _sse(engine_dead_error(str(exc)).body())
        yield _DONE


def validation_error(errors: list[dict]) -> APIError:
    """pydantic errors -> one 400 naming the fields (OpenAI answers invalid parameters with 400)."""
    parts, param, code = [], None, None
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        param = param or (loc.split(".")[0] if loc else None)
        if err.get("type") == UNSUPPORTED:
            code = UNSUPPORTED
            parts.append(err["msg"])
        else:
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return APIError(400, "; ".join(parts), param=param, code=code)


# ---- the app --------------------------------------------------------------------------------
def create_app(client: EngineClientLike, text: TextProcessor, served_model_name: str,
               sla_tps: float = 0.0) -> FastAPI:
    """The HTTP app over a started engine client (`client.info` set). `sla_tps`: the per-user
    decode tokens/s SLA the metrics count requests against (0: none)."""
    metrics = ServerMetrics(sla_tps=sla_tps)
    client.on_stats(metrics.on_engine_step)
    serving = OpenAIServing(client, text, served_model_name, metrics)
    app = FastAPI(title="dspark", docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.serving = serving
    _install_error_handlers(app, metrics)
    _add_routes(app, serving)
    return app


def _add_routes(app: FastAPI, serving: OpenAIServing) -> None:
    client, metrics = serving.client, serving.metrics

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serving.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serving.completion(request)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": serving.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "dspark", "max_model_len": client.info.max_model_len}
        return json_response({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        if client.dead is not None:
            raise engine_dead_error(client.dead)
        return json_response({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def answer(error: APIError) -> Response:
        metrics.on_error(error.status)
        return json_response(error.body(), error.status, error.headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, exc: RequestValidationError) -> Response:
        return answer(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return answer(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> Response:  # real bugs only
        log.exception("unhandled error")
        return answer(APIError(500, f"internal server error: {type(exc).__name__}", type="server_error"))
