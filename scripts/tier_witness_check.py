"""The tier e2e scenario (`tests/e2e/test_tiered_engine.py`) per tier setup and dtype, with
the KV witness: its counts next to the blocks the tiers report loaded, and whether the greedy
tokens equal the tier-off run of the same dtype. For the GPU machine, where the e2e tests'
token check can fail by step-shape variance in bf16, while the witness tells whether any
load wrote wrong bits.

    KVTIER_TEST_TINY_MODEL=random:tiny-qwen2 PYTHONPATH=src python3 scripts/tier_witness_check.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import test_tiered_engine as scenario  # noqa: E402 - the e2e tests' workload and engine

from kvtier.config import DTYPES  # noqa: E402
from kvtier.utils.kv_witness import KVWitness  # noqa: E402


def run_setup(setup: str | None, dtype: str, async_scheduling: bool) -> dict:
    args: dict = {"dtype": dtype, "async_scheduling": async_scheduling}
    with tempfile.TemporaryDirectory() as tmp:
        if setup is not None:
            args.update(scenario.TIER_SETUPS[setup])
            args["kv_tiers"] = tuple(t.format(tmp=tmp) for t in args["kv_tiers"])
        llm = scenario.make_llm(**args)
        with KVWitness(llm.engine) as witness:
            tokens = (scenario.run(llm, scenario.workload()),
                      scenario.run(llm, scenario.workload(seed=1, num_requests=8),
                                   concurrent=True))
        tiers = llm.engine.tiers
        hit_blocks = (sum(tiers.stats.hit_tokens.values()) // scenario.BLOCK
                      if tiers is not None else 0)
        scenario.finish(llm)
    return {"tokens": tokens, "witness": dataclasses.asdict(witness.counts),
            "tier_hit_blocks": hit_blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="cpu+disk-lazy,cpu+disk-write-through,cpu-lazy",
                        help=f"comma-separated, of {sorted(scenario.TIER_SETUPS)}")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--out", default="tier_witness.json")
    args = parser.parse_args()
    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in scenario.TIER_SETUPS]
    if unknown:
        parser.error(f"unknown --setups {unknown}; known: {sorted(scenario.TIER_SETUPS)}")
    bad_dtypes = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad_dtypes:
        parser.error(f"unknown --dtypes {bad_dtypes}; known: {list(DTYPES)}")
    report: dict = {"card": (torch.cuda.get_device_name() if torch.cuda.is_available()
                             else "cpu"), "model": scenario.TINY_MODEL, "runs": []}
    for dtype in args.dtypes.split(","):
        for async_scheduling in (False, True):
            reference = run_setup(None, dtype, async_scheduling)
            for setup in setups:
                result = run_setup(setup, dtype, async_scheduling)
                row = {"dtype": dtype, "async": async_scheduling, "setup": setup,
                       "tokens_equal_tier_off": result["tokens"] == reference["tokens"],
                       "tier_hit_blocks": result["tier_hit_blocks"], **result["witness"]}
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
