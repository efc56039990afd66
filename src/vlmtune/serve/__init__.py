"""``vlmtune serve``'s machinery: an OpenAI-compatible chat completions API over one checkpoint.

``protocol.py`` reads a request (messages, content parts, images) into vlmtune's (role, text) turns and PIL images,
``engine.py`` turns those into one batched ``generate`` call with per-request stops, ``batcher.py`` gathers requests
that arrive together into one call, and ``app.py`` is the HTTP surface (FastAPI on uvicorn), its errors in OpenAI's
shape. ``vlmtune.commands.serve`` loads the checkpoint and starts it.
"""
