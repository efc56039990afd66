"""`vlmtune serve` driven by the official `openai` client against a real server (uvicorn in a thread, tiny random
Qwen2-VL): completions with images, streaming, stops, seeds, concurrent requests batched, and every refusal a 4xx in
OpenAI's error shape."""

from __future__ import annotations

import base64
import http.client
import io
import json
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
from PIL import Image

from vlmtune.commands import serve

KEY = "test-key"
MODEL = "tiny"


def png_uri(colour: str = "red", size: int = 56) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, text: str = "what colour is the shape?") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    """A folder the server may read images from, a PNG inside it and one outside it."""
    root = tmp_path_factory.mktemp("serve-files")
    (root / "allowed").mkdir()
    Image.new("RGB", (56, 56), "blue").save(root / "allowed" / "blue.png")
    Image.new("RGB", (56, 56), "green").save(root / "outside.png")
    return root


@pytest.fixture(scope="module")
def server(tiny_dir, allowed):
    args = ["--checkpoint", str(tiny_dir), "--port", "0", "--api-key", KEY, "--model-name", MODEL]
    args += ["--allow-local-files", str(allowed / "allowed"), "--max-body-mb", "1", "--batch-wait-ms", "50"]
    args += ["--max-batch", "16"]
    running = serve.start(serve.parse(args))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def plain_server(tiny_dir):
    """Started without --allow-local-files and without an API key."""
    running = serve.start(serve.parse(["--checkpoint", str(tiny_dir), "--port", "0", "--model-name", MODEL]))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **{"max_tokens": 6, "temperature": 0, **kw})


def raw(server, method: str, path: str, body=None, headers: dict | None = None, chunked: bool = False):
    """(status, parsed JSON) of a request sent with http.client (what the openai client cannot send)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request(
        method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})}, encode_chunked=chunked
    )
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def test_a_completion_with_an_image_has_text_and_usage(client):
    r = ask(client, image_message(png_uri()))
    assert r.model == MODEL and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6
    # the image's tokens are in the prompt: the same question without it is far shorter
    text_only = ask(client, [{"role": "user", "content": "what colour is the shape?"}])
    assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 4
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_sends_the_same_answer_in_pieces(client):
    messages = image_message(png_uri("yellow"))
    whole = ask(client, messages, max_tokens=8)
    chunks = list(ask(client, messages, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_cuts_the_answer_and_max_tokens_limits_it(client):
    messages = [{"role": "user", "content": "describe the picture"}]
    full = ask(client, messages, max_tokens=12)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = ask(client, messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_reproducible(client):
    messages = [{"role": "user", "content": "say something"}]
    a, b = (ask(client, messages, temperature=1.0, top_p=0.9, seed=7, max_tokens=10) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    others = {
        ask(client, messages, temperature=1.0, seed=s, max_tokens=10).choices[0].message.content for s in range(4)
    }
    assert len(others) > 1


def test_16_concurrent_requests_all_succeed_and_share_generate_calls(server, client):
    before = raw(server, "GET", "/health")[1]["batching"]["batch_sizes"]
    colours = ["red", "green", "blue", "yellow"] * 4
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda c: ask(client, image_message(png_uri(c))), colours))
    assert len(answers) == 16 and all(a.choices[0].message.content is not None for a in answers)
    # same prompt, greedy: the same answer whatever batch it landed in
    for colour in set(colours):
        assert len({a.choices[0].message.content for a, c in zip(answers, colours) if c == colour}) == 1
    after = raw(server, "GET", "/health")[1]["batching"]["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert sum(size * n for size, n in new.items()) == 16
    assert max(new) > 1, new


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL


def test_local_files_only_inside_the_allowed_folder(server, plain_server, allowed):
    inside = ask(
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0),
        image_message(str(allowed / "allowed" / "blue.png")),
    )
    assert inside.choices[0].message.content is not None
    plain = openai.OpenAI(base_url=plain_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="--allow-local-files"):
        ask(plain, image_message(str(allowed / "allowed" / "blue.png")))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    for outside in (allowed / "outside.png", allowed / "allowed" / ".." / "outside.png"):
        with pytest.raises(openai.BadRequestError, match="outside the folder") as e:
            ask(client, image_message(f"file://{outside}"))
        assert e.value.body["code"] == "local_files_not_allowed"


BAD_REQUESTS = [
    # name, request fields, error class, status, text the message holds
    ("unknown-model", {"model": "gpt-4o"}, openai.NotFoundError, 404, "does not exist here"),
    (
        "bad-image",
        {"messages": image_message("data:image/png;base64," + base64.b64encode(b"not a png").decode())},
        openai.BadRequestError,
        400,
        "not an image that decodes",
    ),
    (
        "bad-base64",
        {"messages": image_message("data:image/png;base64,@@@")},
        openai.BadRequestError,
        400,
        "does not decode",
    ),
    (
        "http-url",
        {"messages": image_message("https://example.com/cat.png")},
        openai.BadRequestError,
        400,
        "never fetches URLs",
    ),
    (
        "video-part",
        {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x.mp4"}}]}]},
        openai.BadRequestError,
        400,
        "not served",
    ),
    ("too-many-tokens", {"max_tokens": 10**6}, openai.BadRequestError, 400, "context"),
    ("unknown-field", {"extra_body": {"best_of": 3}}, openai.BadRequestError, 400, "best_of"),
    ("n-above-1", {"n": 2}, openai.BadRequestError, 400, "invalid request: n"),
    ("negative-temperature", {"temperature": -1}, openai.BadRequestError, 400, "temperature"),
]


@pytest.mark.parametrize("fields,error,status,text", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_in_openai_shape(client, fields, error, status, text):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    with pytest.raises(error) as e:
        client.chat.completions.create(**request)
    assert e.value.status_code == status
    assert text in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers,fragment", [({}, "no API key"), ({"Authorization": "Bearer wrong"}, "wrong API key")])
def test_the_api_key_is_checked_on_every_request(server, headers, fragment):
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        status, body = raw(server, method, path, b"{}", {"Authorization": "", **headers})
        assert status == 401 and fragment in body["error"]["message"] and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        ask(
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0),
            [{"role": "user", "content": "hi"}],
        )


def test_an_oversized_body_is_413_with_or_without_content_length(server, client):
    big = png_uri(size=1200).ljust(2 * 2**20, "A")  # over --max-body-mb 1
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, image_message(big))
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    body = json.dumps({"model": MODEL, "messages": image_message(big)}).encode()
    pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
    status, data = raw(
        server, "POST", "/v1/chat/completions", pieces, {"Content-Type": "application/json"}, chunked=True
    )
    assert status == 413 and data["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("body,fragment", [(b"{not json", "not valid JSON"), (b'{"model": "tiny"}', "messages")])
def test_bad_json_is_400(server, body, fragment):
    status, data = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 400 and fragment in data["error"]["message"]


def test_unknown_paths_are_404_in_openai_shape(server):
    status, data = raw(server, "POST", "/v1/completions", b"{}")
    assert status == 404 and data["error"]["code"] == "not_found"


def test_generation_does_not_block_the_event_loop(server, client):
    import threading
    import time

    done = {}

    def long_request():
        start = time.perf_counter()
        done["answer"] = ask(client, [{"role": "user", "content": "tell a long story"}], max_tokens=120)
        done["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)
    start = time.perf_counter()
    status, _ = raw(server, "GET", "/health")
    health = time.perf_counter() - start
    thread.join()
    assert status == 200 and done["answer"].usage.completion_tokens == 120
    assert health < done["seconds"] / 4, (health, done["seconds"])
