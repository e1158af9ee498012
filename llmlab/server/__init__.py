"""Serving: an OpenAI-compatible API over the continuous-batching scheduler, a static web chat UI, and the
feedback store whose ratings, flags and comparisons become training data (llmlab.data.feedback).

    app.py          create_app: wires the service, the error handlers, the guard and the routes together
    service.py      ServerConfig (the flags of `llmlab serve`) and Service (scheduler, tokenizer, store, limits)
    http.py         OpenAI-shaped errors, server-sent events, the API key and body-size guard
    openai_api.py   /v1: models, chat completions, completions (the API's sampling defaults)
    ui_api.py       / and /api: the web UI's page, conversations, replies and feedback (the UI's defaults)
    schemas.py      request bodies (pydantic), and the one mapping of their sampling fields to SamplingParams
    generation.py   scheduler events -> response text, tool calls, stop sequences, logprobs
    store.py        the feedback store (SQLite): persists conversations, ratings, flags, comparisons
"""
