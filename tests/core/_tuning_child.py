"""The interrupted half of the resume test: tunes with a history file and SIGKILLs itself mid-run.

Usage: python _tuning_child.py HISTORY_PATH KILL_AT_EVAL_CALL
The process kills itself when eval_fn is called for the KILL_AT-th time (the baseline is call 1),
so the trials before it are in the history file and the one being evaluated is not.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _synthetic_backend as sb  # noqa: E402

from inc_core.tuning import autotune  # noqa: E402


def main(history: str, kill_at: int) -> None:
    sb.register()
    calls = 0

    def eval_fn(model: Any) -> float:
        nonlocal calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return sb.score(model)

    autotune(sb.SyntheticModel(), sb.resume_config(history), eval_fn=eval_fn, dataset=sb.calib_data(), backend="synthetic")
    sys.exit("the run was expected to be killed before it finished")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
