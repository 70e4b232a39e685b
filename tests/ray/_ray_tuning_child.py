"""A driver that a test kills or interrupts mid-run: tunes on the test cluster with a history file.

Usage: python _ray_tuning_child.py CLUSTER_ADDRESS HISTORY_PATH [--interrupt-after N]
Each evaluation on a worker takes 1 s, so the parent can stop this process while trials are in
flight. On Ctrl-C it prints INTERRUPTED and exits with status 130. With ``--interrupt-after N`` the
driver interrupts itself, as Ctrl-C would, right after the N-th trial is recorded: a signal sent from
outside lands wherever the driver happens to be (inside Ray's own C++ wait, it is not always seen
at once), so the test of what an interrupt does uses this fixed point while trials are in flight.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workload  # noqa: E402

from inc_core.tuning import RayExecutor, autotune  # noqa: E402


def _interrupt_after(count: int) -> None:
    from inc_core.tuning._history import History

    add = History.add

    def add_then_interrupt(self: History, trial: object) -> None:
        add(self, trial)
        if len(self.trials) >= count:
            raise KeyboardInterrupt

    History.add = add_then_interrupt  # type: ignore[method-assign]


def main(address: str, history: str, interrupt_after: int | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    if interrupt_after is not None:
        _interrupt_after(interrupt_after)
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
    main(sys.argv[1], sys.argv[2], int(sys.argv[4]) if sys.argv[3:4] == ["--interrupt-after"] else None)
