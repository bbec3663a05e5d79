"""The OpenAI-compatible HTTP server (`kvtier serve`).

    launch.py   uvicorn, signals, drain          app.py       create_app: routes, health, metrics
    serving.py  request -> engine -> response    protocol.py  OpenAI pydantic models
    errors.py   OpenAI error bodies              middleware.py API key, body size cap
    metrics.py  Prometheus registry per app      args.py      `kvtier serve` flags

Imports only go down: server -> engine (AsyncEngine) -> the rest. Nothing here is imported by
`import kvtier`, so the offline API does not pay for FastAPI.
"""
