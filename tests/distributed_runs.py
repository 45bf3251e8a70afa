"""Run several trainings one after another in this process (launched once per process group:
torch.distributed.run, or plain python for one process), so the tests of tests/test_distributed.py
pay the start-up (imports, process group) once. Usage:

    python tests/distributed_runs.py RUNS.json

RUNS.json: a list of {"args": [train_sipo.py arguments], "env": {variables set for that run}}.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_sipo  # noqa: E402


def main(runs_file: str) -> int:
    for run in json.loads(Path(runs_file).read_text()):
        saved = {name: os.environ.get(name) for name in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        try:
            code = train_sipo.main(run["args"])
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
