"""A tiny OpenAI-compatible streaming server for lab tests, run as a subprocess by `launch`.

    python fake_openai.py --port P [--delay-ms D] [--fail-every N] [--kvtier]
                          [--reset-status S]

Streams one word per max_tokens with `delay-ms` between chunks and a final usage chunk; every
N-th request answers HTTP 500; with --kvtier, /metrics exposes kvtier-named counters (prompt
tokens = prompt words, half of them counted as device hits, a quarter as cpu-tier hits).
POST /reset_prefix_cache answers `reset-status` (200) and prints "reset after N requests" to
stdout (the lab's server log).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


class Fake:
    def __init__(self, delay_s: float, fail_every: int, kvtier: bool,
                 reset_status: int = 200) -> None:
        self.delay_s, self.fail_every, self.kvtier = delay_s, fail_every, kvtier
        self.reset_status = reset_status
        self.requests = self.succeeded = self.prompt_tokens = self.generated = 0

    async def reset(self, request: web.Request) -> web.Response:
        print(f"reset after {self.requests} requests", flush=True)
        return web.Response(status=self.reset_status, text="reset answer")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "random:tiny-llama"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.kvtier:
            return web.Response(text=f"fake_requests_total {self.requests}\n")
        hits = self.prompt_tokens // 2
        model = 'model_name="random:tiny-llama"'  # on every series, as kvtier's and vLLM's
        lines = [f"kvtier:prompt_tokens_total{{{model}}} {self.prompt_tokens}",
                 f"kvtier:generation_tokens_total{{{model}}} {self.generated}",
                 f"kvtier:prefix_cache_hits_total{{{model}}} {hits + self.prompt_tokens // 4}",
                 f'kvtier:tier_hit_tokens_total{{{model},tier="cpu"}} {self.prompt_tokens // 4}',
                 f'kvtier:request_success_total{{{model},finished_reason="length"}} '
                 f'{self.succeeded}',
                 f"kvtier:kv_cache_total_blocks{{{model}}} 64"]
        return web.Response(text="\n".join(lines) + "\n")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        if self.fail_every and self.requests % self.fail_every == 0:
            return web.Response(status=500, text="injected failure")
        prompt = body.get("prompt") or body["messages"][-1]["content"]
        n_prompt, n_out = len(str(prompt).split()), int(body.get("max_tokens", 4))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(n_out):
            await asyncio.sleep(self.delay_s)
            chunk = {"choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                 "total_tokens": n_prompt + n_out}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        self.prompt_tokens += n_prompt
        self.generated += n_out
        self.succeeded += 1
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=1.0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--kvtier", action="store_true")
    parser.add_argument("--reset-status", type=int, default=200)
    args = parser.parse_args()
    fake = Fake(args.delay_ms / 1000, args.fail_every, args.kvtier, args.reset_status)
    app = web.Application()
    app.router.add_post("/v1/completions", fake.generate)
    app.router.add_post("/v1/chat/completions", fake.generate)
    app.router.add_get("/v1/models", fake.models)
    app.router.add_get("/health", fake.health)
    app.router.add_get("/metrics", fake.metrics)
    app.router.add_post("/reset_prefix_cache", fake.reset)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
