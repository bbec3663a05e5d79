"""The benchmark lab: `kvtier bench` and `kvtier lab` on top of `kvtier.bench`.

Answers "for this workload, does a KV tier help, by how much, and at what cost?" by running
server configurations × workloads and comparing them the way the seed article does. Talks to
servers over HTTP and starts them as subprocesses, so it imports neither torch nor the engine
(a test checks it) and measures vLLM ± LMCache the same way where they are installed.

    experiment.py   Experiment / ServerSpec / WorkloadSpec from TOML, validated (field names)
    presets/        built-in experiments: seed-cpu, seed-gpu, smoke
    server.py       start `kvtier serve` or a launch command, wait for /health, tear down
    runner.py       servers × workloads -> RunRecords, written after every run
    records.py      RunRecord, results.json and results.csv
    server_stats.py kvtier's /metrics diff -> prompt tokens matched per tier
    table.py        the article's side-by-side table with % change vs the first configuration
    plots.py        TTFT CDF, ITL distribution, throughput bars, regime map, sweep plot
    report.py       report.md
    sweep.py        one pressure knob, tier off vs on
    tokenizer.py    the served model's tokenizer without the engine
    bench_cli.py    `kvtier bench` flags (generated from BenchConfig) and handler
    bench_run.py    `kvtier bench` preflight, run, print, save
    lab_cli.py      `kvtier lab` forms and handlers
    progress.py     rich progress bars

Nothing is imported here: `kvtier.cli` imports the two *_cli modules to build its parser, and
everything heavy (matplotlib, aiohttp) is imported by the handlers.
"""
