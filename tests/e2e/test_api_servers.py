"""`kvtier serve --api-server-count 2`: two HTTP front-end processes, one engine process.

Both front ends must serve (the kernel spreads connections over them), their streams must
equal the offline engine's, any front end's `/metrics` must count every request, a client
that leaves must free its blocks whichever front end it reached, SIGTERM must drain both
and exit 0, and a front end that dies must take the whole server down (exit 1), leaving no
process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from kvtier import LLM, SamplingParams
from tests.e2e.test_server import (
    ENGINE_FLAGS,
    GREEDY,
    MAX_MODEL_LEN,
    MODEL,
    NUM_BLOCKS,
    ServerProcess,
    _stream_completion,
    finished_total,
    parse_sse,
    spawned_children,
    wait_idle,
)

pytestmark = pytest.mark.slow
assert "--model" in ENGINE_FLAGS


@contextlib.contextmanager
def server(*flags: str, env: dict[str, str] | None = None,
           new_session: bool = False) -> Iterator[ServerProcess]:
    proc = ServerProcess(*flags, env=env, new_session=new_session)
    processes = spawned_children(proc.proc.pid)
    try:
        yield proc
    finally:  # a failed assertion must not leave a server running
        proc.proc.kill()
        for pid in processes:  # still ours only while it runs multiprocessing's spawn_main
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def ttft_counts_by_process(metrics_dir: Path) -> dict[int, float]:
    """Each front end's TTFT observations, from its prometheus multiprocess file."""
    counts = {}
    for path in metrics_dir.glob("histogram_*.db"):
        values = MmapedDict(str(path)).read_all_values()
        counts[int(path.stem.split("_")[1])] = sum(
            value for key, value, *_ in values
            if json.loads(key)[1] == "kvtier:time_to_first_token_seconds_bucket")
    return counts


def wait_gone(pids: list[int], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def test_two_api_servers_share_the_engine_the_load_and_the_metrics(tmp_path: Path) -> None:
    with server("--api-server-count", "2",
                env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}) as proc:
        check_two_api_servers(proc, tmp_path)


def check_two_api_servers(proc: ServerProcess, tmp_path: Path) -> None:
    url = proc.url
    processes = spawned_children(proc.proc.pid)
    assert len(processes) == 3  # the engine process and two front ends, nothing else
    # Torch is loaded by the engine process alone: not by the front ends or the supervisor.
    assert sorted("libtorch" in Path(f"/proc/{pid}/maps").read_text()
                  for pid in [proc.proc.pid, *processes]) == [False, False, False, True]
    # Each front end froze its start-up heap before it announced itself ready.
    assert sum("start-up objects (front end)" in line for line in proc.lines) == 2
    rng = random.Random(7)
    prompts: list[Any] = [f"Request {i}: a {rng.choice(['small', 'large'])} "
                          f"{rng.choice(['boat', 'cloud', 'stone'])} was" for i in range(24)]
    prompts += [[rng.randrange(100, 40_000) for _ in range(rng.randrange(5, 60))]
                for _ in range(24)]
    llm = LLM(MODEL, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=NUM_BLOCKS)
    expected = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    before = wait_idle(url)

    async def run_all() -> list[tuple[str, dict[str, Any]]]:
        # One connection per request, so the kernel picks a front end for each.
        async def one(prompt: Any) -> tuple[str, dict[str, Any]]:
            async with httpx.AsyncClient(timeout=120) as http:
                return await _stream_completion(http, url, prompt, 16)
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(run_all())
    assert [text for text, _ in results] == [e.outputs[0].text for e in expected]
    after = wait_idle(url)
    assert finished_total(after) - finished_total(before) == len(prompts)
    assert after["kvtier:generation_tokens_total"] \
        - before["kvtier:generation_tokens_total"] == 16 * len(prompts)
    # Both front ends served, and a scrape of either adds both up.
    per_process = ttft_counts_by_process(tmp_path)
    assert len(per_process) == 2 and all(count > 0 for count in per_process.values())
    assert set(per_process) < set(processes)
    for _ in range(4):  # fresh connections: whichever front end answers says the same
        ttft = wait_idle(url)["kvtier:time_to_first_token_seconds_count"]
        assert ttft == sum(per_process.values()) == len(prompts)

    async def leave_early(i: int) -> None:
        body = {"model": MODEL, "prompt": f"leave {i}", "max_tokens": 200, "ignore_eos": True,
                "stream": True, **GREEDY}
        async with httpx.AsyncClient(timeout=60) as http, \
                http.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                break  # the first event, then hang up

    async def leave_all() -> None:
        await asyncio.gather(*(leave_early(i) for i in range(8)))

    asyncio.run(leave_all())
    wait_idle(url)  # every aborted request's blocks are free again, whichever front end
    assert proc.stop() == 0, "".join(proc.lines[-30:])
    wait_gone(processes)
    assert "kvtier serve: stopped" in "".join(proc.lines)


def test_sigterm_drains_both_api_servers_then_exits_zero() -> None:
    with server("--api-server-count", "2", "--shutdown-timeout", "2",
                "--max-model-len", "2048") as proc:
        check_sigterm_drain(proc)


def check_sigterm_drain(proc: ServerProcess) -> None:
    url, processes = proc.url, spawned_children(proc.proc.pid)

    async def scenario() -> list[str]:
        async def stream(max_tokens: int, i: int) -> str:
            body = {"prompt": f"drain {i}", "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": True, **GREEDY}
            async with httpx.AsyncClient(timeout=60) as http:
                return (await http.post(f"{url}/v1/completions", json=body)).text

        # Four short streams finish within the grace period, four long ones cannot.
        tasks = [asyncio.ensure_future(stream(n, i))
                 for i, n in enumerate([30, 1900] * 4)]
        await asyncio.sleep(1.0)  # all eight are in flight
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # neither front end listens any more
            httpx.get(f"{url}/health")
        return list(await asyncio.gather(*tasks))

    bodies = asyncio.run(scenario())
    finished = [parse_sse(body)[0][-1] for body in bodies]
    assert [e["choices"][0]["finish_reason"] for e in finished[0::2]] == ["length"] * 4
    assert [e["error"]["code"] for e in finished[1::2]] == ["request_shutdown"] * 4
    assert proc.proc.wait(60) == 0, "".join(proc.lines[-30:])
    wait_gone(processes)


def test_a_dead_api_server_stops_the_whole_server() -> None:
    with server("--api-server-count", "2") as proc:
        check_dead_api_server(proc)


def check_dead_api_server(proc: ServerProcess) -> None:
    processes = spawned_children(proc.proc.pid)
    assert httpx.get(f"{proc.url}/health").status_code == 200
    # The supervisor spawns the engine process first, then the front ends: the newest pid is
    # a front end.
    os.kill(max(processes), signal.SIGKILL)
    assert proc.proc.wait(60) == 1, "".join(proc.lines[-30:])
    wait_gone(processes)
    assert "stopped unexpectedly" in "".join(proc.lines)


def test_a_killed_supervisor_leaves_no_process_behind() -> None:
    with server("--api-server-count", "2") as proc:
        processes = spawned_children(proc.proc.pid)
        assert httpx.get(f"{proc.url}/health").status_code == 200
        proc.proc.kill()  # SIGKILL: nothing of the supervisor runs to stop its children
        proc.proc.wait(10)
        wait_gone(processes)  # the front ends drained and stopped, then the engine
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{proc.url}/health")


@pytest.mark.parametrize("count", ["1", "2"])
def test_sigterm_to_the_process_group_still_drains(count: str) -> None:
    # As the lab and process managers stop a server: every process of the group gets the
    # signal, the engine process included. It must leave the stopping to its front ends, so
    # a stream in flight still finishes.
    with server("--api-server-count", count, new_session=True) as proc:
        processes = spawned_children(proc.proc.pid)

        async def scenario() -> str:
            body = {"prompt": "group", "max_tokens": 200, "ignore_eos": True,
                    "stream": True, **GREEDY}
            async with httpx.AsyncClient(timeout=60) as http:
                task = asyncio.ensure_future(http.post(f"{proc.url}/v1/completions",
                                                       json=body))
                await asyncio.sleep(0.5)
                os.killpg(proc.proc.pid, signal.SIGTERM)
                return (await task).text

        events, _ = parse_sse(asyncio.run(scenario()))
        assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
        assert proc.proc.wait(60) == 0, "".join(proc.lines[-30:])
        wait_gone(processes)


def test_api_server_count_must_be_positive() -> None:
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", *ENGINE_FLAGS,
                           "--api-server-count", "0"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "--api-server-count: must be >= 1, got 0" in done.stderr


def test_an_engine_that_cannot_start_stops_every_api_server(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", "--model",
                           str(tmp_path / "missing"), "--api-server-count", "2", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]  # a bad --model, as with one API server
    assert done.stderr.count(f"kvtier serve: error: {tmp_path / 'missing'}: ") == 1
    assert "ready on" not in done.stderr
