"""The `kvtier` command: generate, serve, demo, bench, lab."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kvtier.config import ConfigError
from kvtier.types import InvalidRequestError


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="print each output token's logprob and rank, and the N most likely "
                        "tokens at its position (to stderr)")


def build_parser() -> argparse.ArgumentParser:
    from kvtier.engine.args import add_engine_args
    from kvtier.server.args import add_server_args

    parser = argparse.ArgumentParser(prog="kvtier", description=__doc__)
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING (default: INFO for serve, else WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    add_engine_args(gen)
    _add_sampling_args(gen)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, "
                                         "/v1/chat/completions, /metrics)")
    add_engine_args(serve)
    add_server_args(serve)

    demo = sub.add_parser("demo", help="chat answers, a prefix-cache hit and throughput on the "
                                       "embedded model")
    add_engine_args(demo)

    from kvtier.lab.bench_cli import add_bench_parser
    from kvtier.lab.lab_cli import add_lab_parser

    add_bench_parser(sub)
    add_lab_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A server reports its engine's throughput every few seconds, like vLLM's; other commands
    # stay quiet unless asked.
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            from kvtier.server.launch import run_server
            return run_server(args)
        if args.command == "demo":
            from kvtier.demo import run_demo
            return run_demo(args)
        if args.command == "bench":
            from kvtier.lab.bench_cli import run_bench
            return run_bench(args)
        if args.command == "lab":
            from kvtier.lab.lab_cli import run_lab
            return run_lab(args)
    except (ConfigError, InvalidRequestError, ValueError, FileNotFoundError) as exc:
        print(f"kvtier {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


def _generate(args: argparse.Namespace) -> int:
    from kvtier import LLM, SamplingParams
    from kvtier.engine.args import engine_kwargs

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed,
                            stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos,
                            min_p=args.min_p, min_tokens=args.min_tokens,
                            repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, logprobs=args.logprobs)
    llm = LLM(**engine_kwargs(args))
    try:
        if args.chat:
            output = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
        else:
            output = llm.generate(args.prompt, params)[0]
    finally:
        llm.shutdown()  # what a disk or redis tier should keep is written before the exit
    completion = output.outputs[0]
    print(completion.text)
    tokenizer = llm.get_tokenizer()
    for entry in completion.logprobs or ():
        top = ", ".join(f"{tokenizer.decode([t], False)!r} {lp:.3f}" for t, lp in entry.top)
        print(f"{tokenizer.decode([entry.token_id], False)!r:>16} logprob {entry.logprob:8.3f} "
              f"rank {entry.rank:>6}" + (f" | top: {top}" if top else ""), file=sys.stderr)
    m = output.metrics
    elapsed = (m.finished_time or 0) - m.arrival_time
    ttft = (m.time_to_first_token or 0) * 1000
    print(f"[{m.num_prompt_tokens} prompt tokens ({m.num_cached_tokens} cached), "
          f"{len(completion.token_ids)} output tokens, finish={completion.finish_reason}, "
          f"TTFT {ttft:.0f} ms, {len(completion.token_ids) / max(elapsed, 1e-9):.1f} tok/s]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
