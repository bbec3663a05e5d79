"""An argument the engine refuses at start-up (a model the loader cannot read, a
--max-model-len past the model's positions) ends `kvtier serve` with one line and exit 2,
whatever the number of API servers: no traceback from the engine process, no supervisor
lines. Before, the engine process logged its traceback, and with --api-server-count 2 the
server exited 1 after "an API server failed to start; see its log above" and "stopped"."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def _serve(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", "--device", "cpu",
                           "--port", "0", *flags], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_max_model_len_past_the_models_positions_is_one_line(count: str) -> None:
    done = _serve("--model", "random:tiny-llama", "--max-model-len", "99999",
                  "--api-server-count", count)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "kvtier serve: error: max_model_len 99999 is more than the model's "
        "max_position_embeddings 2048"]


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_model_directory_without_config_is_one_line(tmp_path: Path, count: str) -> None:
    done = _serve("--model", str(tmp_path), "--api-server-count", count)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"kvtier serve: error: {tmp_path}: not a model directory (no config.json)"]


def test_a_disk_tier_folder_another_server_holds_is_one_line(tmp_path: Path) -> None:
    """Two servers on one disk-tier folder would delete each other's entries behind each
    other's index: the second is refused while the first runs (the folder's flock)."""
    tier = f"disk:{tmp_path}:64MiB"
    # A small device pool: sized from host memory, the CPU pool's allocation took most of
    # each start's ~17 s on a 2-core box, and the folder's lock is what is tested.
    small_pool = ("--num-gpu-blocks-override", "64")
    first = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--device", "cpu",
                              "--port", "0", "--model", "random:tiny-llama", "--kv-tier", tier,
                              *small_pool], stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr is not None
        for line in first.stderr:  # until it serves (its tier holds the folder)
            if line.startswith("kvtier serve: ready on"):
                break
        else:
            pytest.fail(f"the first server exited {first.wait()} before it served")
        [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
        for count in ("1", "2"):
            done = _serve("--model", "random:tiny-llama", "--kv-tier", tier,
                          "--api-server-count", count, *small_pool)
            assert done.returncode == 2, done.stderr[-2000:]
            [line] = done.stderr.splitlines()
            holder = re.fullmatch(
                re.escape(f"kvtier serve: error: disk tier folder {folder} is in use by "
                          f"another kvtier process (lock file {folder}/.kvtier.lock, held by "
                          "pid ") + r"(\d+)\)", line)
            assert holder is not None, line
            # The first server's engine process holds it.
            ppid = Path(f"/proc/{holder[1]}/stat").read_text().rsplit(")", 1)[1].split()[1]
            assert int(ppid) == first.pid
    finally:
        first.terminate()
        first.wait(timeout=60)


@pytest.mark.parametrize(("template", "message"), [
    ("no/such/template.jinja", "--chat-template: chat template 'no/such/template.jinja' looks "
                               "like a file path, but it cannot be read: "),
    ("{% if %}", "--chat-template: the chat template is not valid Jinja: "),
])
def test_an_unusable_chat_template_is_one_line(template: str, message: str) -> None:
    done = _serve("--model", "random:tiny-llama", "--chat-template", template)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert line.startswith(f"kvtier serve: error: {message}"), line


def test_a_generation_config_folder_without_the_file_is_one_line(tmp_path: Path) -> None:
    done = _serve("--model", "random:tiny-llama", "--generation-config", str(tmp_path),
                  "--num-gpu-blocks-override", "64")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"kvtier serve: error: generation_config {str(tmp_path)!r}: the folder has no "
        "generation_config.json"]


@pytest.mark.parametrize("flags", [["--enable-auto-tool-choice"],
                                   ["--tool-call-parser", "hermes"]])
def test_tool_call_flags_alone_are_one_line(flags: list[str]) -> None:
    done = _serve("--model", "random:tiny-llama", *flags)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "kvtier serve: error: --enable-auto-tool-choice and --tool-call-parser go together: "
        "give both (e.g. --enable-auto-tool-choice --tool-call-parser hermes) or neither"]
