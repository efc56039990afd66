"""The HTTP surface: ``POST /v1/chat/completions`` (plain or streamed as server-sent events), ``GET /v1/models``,
``GET /health``, on FastAPI.

Every refusal is JSON in OpenAI's error shape (``{"error": {message, type, param, code}}``) with a 4xx status: 401
without the API key, 404 for another model or path, 413 for a body over the limit (from Content-Length, and counted
while reading a body sent without one), 400 for everything else (bad JSON, schema, images, token limits). The body is
parsed by vlmtune rather than by FastAPI so each message names the field at fault.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlmtune.serve.batcher import Batcher
from vlmtune.serve.engine import Completion, Engine, Job, Sampling
from vlmtune.serve.protocol import APIError, ChatRequest, conversation, parse_request


@dataclass
class ServeOptions:
    """What the command line sets beyond the model and the batching."""

    api_key: str | None = None
    allow_local_files: Path | None = None
    max_body_bytes: int = 20 * 2**20
    default_max_tokens: int = 256


def create_app(engine: Engine, batcher: Batcher, options: ServeOptions) -> FastAPI:
    """The API over ``engine``; the batcher's task runs while the app does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="vlmtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=options.api_key, max_body_bytes=options.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(
            APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None, code).body(),
            e.status_code,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        return JSONResponse(APIError(400, f"invalid request: {problems}").body(), 400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name, "batching": batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        if name != engine.name:
            raise _unknown_model(name, engine, param=None)
        return _model_card(engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await request.body())
        if req.model != engine.name:
            raise _unknown_model(req.model, engine, param="model")
        job = await run_in_threadpool(_job, engine, req, options)  # image decoding and processing: off the loop
        answer_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(
                _events(batcher, job, answer_id, created, engine.name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        result = await batcher.submit(job)
        return {
            "id": answer_id,
            "object": "chat.completion",
            "created": created,
            "model": engine.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
        }

    return app


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "vlmtune", "max_model_len": engine.context}


def _unknown_model(name: str, engine: Engine, param: str | None) -> APIError:
    return APIError(
        404, f"the model '{name}' does not exist here; this server serves '{engine.name}'", param, "model_not_found"
    )


def _usage(result: Completion) -> dict:
    total = result.prompt_tokens + result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": total}


def _job(engine: Engine, req: ChatRequest, options: ServeOptions) -> Job:
    """The request's prompt features and limits (runs in a worker thread).

    Raises:
        APIError: 400 for a bad image or part, a prompt the processor refuses, or a prompt plus ``max_tokens`` over
            the model's context.
    """
    stops = req.stops()
    messages, images = conversation(req, options.allow_local_files)
    try:
        features = engine.prompt(messages, images)
    except ValueError as e:
        raise APIError(400, f"the messages cannot be made into a prompt: {e}", "messages") from None
    prompt = len(features["input_ids"])
    room = engine.context - prompt
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {prompt} tokens; the model's context is {engine.context} tokens",
            "messages",
            "context_length_exceeded",
        )
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > room:
        raise APIError(
            400,
            f"max_tokens is {asked}, but the prompt ({prompt} tokens) leaves {room} of the model's {engine.context}-token "
            "context",
            "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
            "context_length_exceeded",
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    return Job(
        features=features,
        max_tokens=asked if asked is not None else min(options.default_max_tokens, room),
        stop=stops,
        sampling=Sampling(temperature, 1.0 if req.top_p is None else req.top_p, req.seed),
    )


async def _events(batcher: Batcher, job: Job, answer_id: str, created: int, model: str, include_usage: bool):
    """Server-sent events in OpenAI's ``chat.completion.chunk`` shape, ending with ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    task = asyncio.ensure_future(batcher.submit(job))
    task.add_done_callback(lambda _: pieces.put_nowait(None))

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        body = {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": model}
        body.update(choices=choices, **({"usage": usage} if usage else {}))
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not None:
            yield chunk({"content": piece})
        result = task.result()
        yield chunk({}, result.finish_reason)
        if include_usage:
            yield chunk({}, usage=_usage(result))
    except Exception as e:  # the status line is sent already: the error travels as an event
        error = e if isinstance(e, APIError) else APIError(500, f"generation failed: {type(e).__name__}: {e}")
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        job.cancelled.set()  # a client that left stops its row of the batch
    yield "data: [DONE]\n\n"


class _Guard:
    """ASGI middleware run before routing: the API key on every request, and the body size limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None:
            given = headers.get("authorization", "")
            given = given[7:] if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                why = "wrong API key" if given else "no API key (send 'Authorization: Bearer KEY')"
                error = APIError(401, f"{why}: this server was started with --api-key", None, "invalid_api_key")
                return await JSONResponse(error.body(), 401)(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse(self._too_large(f"{int(length):,}").body(), 413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._too_large(f"over {self.limit:,}")
            return message

        return await self.app(scope, counted, send)

    def _too_large(self, size: str) -> APIError:
        mb = self.limit / 2**20
        return APIError(
            413, f"the request body is {size} bytes; the limit is {mb:g} MB (--max-body-mb)", None, "request_too_large"
        )
