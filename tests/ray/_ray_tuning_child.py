"""A driver that a test kills or interrupts mid-run: tunes on the test cluster with a history file.

Usage: python _ray_tuning_child.py CLUSTER_ADDRESS HISTORY_PATH
Each evaluation on a worker takes 1 s, so the parent can stop this process while trials are in
flight. On Ctrl-C (SIGINT) it prints INTERRUPTED and exits with status 130.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workload  # noqa: E402

from inc_core.tuning import RayExecutor, autotune  # noqa: E402


def main(address: str, history: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    model, data, x, y = _workload.trained()
    with RayExecutor(workers=3, address=address) as executor:
        try:
            autotune(model, _workload.tuning(history=history), eval_fn=_workload.Accuracy(x, y, delay_s=1.0),
                     dataset=data, executor=executor)
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
            sys.exit(130)
    sys.exit("the run was expected to be stopped before it finished")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
