"""The interrupted half of the catalogue's kill -9 cases: a real backend, SIGKILLed mid-tuning or mid-save.

Usage:
    python _kill_child.py tune BACKEND HISTORY KILL_AT   # kill itself on the KILL_AT-th eval_fn call
    python _kill_child.py save BACKEND OUTPUT            # kill itself halfway through writing OUTPUT

BACKEND is ``onnx`` or ``torch``. The models, data and eval_fn are those of the catalogue
(``bad_input_models``), so the parent can finish the same run from the history file.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bad_input_models as bm  # noqa: E402

import inc_core as inc  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def tune(backend: str, history: str, kill_at: int) -> None:
    calls = 0

    def eval_fn(model: Any) -> float:
        nonlocal calls
        calls += 1
        if calls == kill_at:
            _die()
        return bm.score(model)

    model, data = bm.tuning_case(backend)
    inc.autotune(model, bm.tuning_config(backend, history), eval_fn=eval_fn, dataset=data)
    sys.exit("the run was expected to be killed before it finished")


def _write_half_then_die(path: Any, full: bytes) -> None:
    target = Path(str(path))
    with open(target, "wb") as f:
        f.write(full[: len(full) // 2])
        f.flush()
        os.fsync(f.fileno())
    _die()


def save(backend: str, output: str) -> None:
    model, data = bm.tuning_case(backend)
    quantized = inc.quantize(model, bm.tuning_config(backend, None).base, dataset=data)
    # The framework's own writer is replaced by one that writes half of the real bytes and is killed, the
    # way a machine dies mid-write.
    if backend == "onnx":
        import onnx

        def save_model(proto: Any, path: Any, *args: Any, **kwargs: Any) -> None:
            _write_half_then_die(path, proto.SerializeToString())

        onnx.save_model = save_model
    else:
        import io

        import torch

        real_save = torch.jit.save

        def jit_save(module: Any, path: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(module, buffer, *args, **kwargs)
            _write_half_then_die(path, buffer.getvalue())

        torch.jit.save = jit_save
    inc.save(quantized, output)
    sys.exit("the save was expected to be killed before it finished")


if __name__ == "__main__":
    if sys.argv[1] == "tune":
        tune(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        save(sys.argv[2], sys.argv[3])
