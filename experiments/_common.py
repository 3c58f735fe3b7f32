"""Helpers shared by the Fashion-MNIST experiments: the command line, the data (dequantized,
in [0, 1] or logit space), timing and peak-memory helpers from ``benchmarks/_common.py``, and
JSON output with the environment.

Every experiment script takes ``--smoke`` (tiny sizes, seconds: what the tests run, on small
stand-in idx files written by the test) and ``--json PATH``; figures go to ``--figures DIR``.
This module imports neither torch nor JAX.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
FIGURES = ROOT / "experiments" / "figures"


def _load_benchmark_helpers():
    """``benchmarks/_common.py`` (timing, memory, JSON), loaded under another name: both
    folders name their helpers ``_common``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_benchmark_common", ROOT / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_bench = _load_benchmark_helpers()
environment_meta = _bench.environment_meta
fmt = _bench.fmt
interleaved_timings = _bench.interleaved_timings
markdown_table = _bench.markdown_table
maxrss_bytes = _bench.maxrss_bytes
torch_peak_bytes = _bench.torch_peak_bytes
write_json_object = _bench.write_json_object
run_worker = _bench.run_worker
emit_worker_result = _bench.emit_worker_result

from ppl_score.datasets import load_fashion_mnist  # noqa: E402 (after the helpers, as in benchmarks/)

__all__ = [
    "ROOT",
    "RESULTS",
    "FIGURES",
    "make_parser",
    "load_images",
    "to_logit",
    "from_logit",
    "environment_meta",
    "fmt",
    "interleaved_timings",
    "markdown_table",
    "maxrss_bytes",
    "torch_peak_bytes",
    "write_json_object",
    "run_worker",
    "emit_worker_result",
    "single_thread",
    "exit_with_error",
]


def single_thread() -> None:
    """One intra-op thread for torch and XLA (set before JAX is imported): the experiments are
    measured on a shared 2-core machine, and two run side by side."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    # only well-formed "--name=value" flags: a bare token (the often quoted
    # "intra_op_parallelism_threads=1") makes XLA drop the flags after it, e.g. a later
    # --xla_force_host_platform_device_count in a child process that inherits this environment
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def exit_with_error(message: str) -> NoReturn:
    """End the script as argparse's ``parser.error`` does: ``PROG: error: MESSAGE`` on stderr
    and exit status 2, no traceback."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "experiment"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def make_parser(description: str) -> argparse.ArgumentParser:
    """``--smoke``, ``--json PATH``, ``--figures DIR``, ``--seed``, ``--data DIR`` (idx files;
    default: ``$PPL_SCORE_DATA`` or the Debian package). Scripts add their own options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (what the tests run)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--figures", metavar="DIR", default=str(FIGURES), help="where the figures go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", metavar="DIR", default=None, help="directory of the idx files")
    return p


def load_images(
    n_train: int | None = None,
    n_test: int | None = None,
    *,
    seed: int = 0,
    path=None,
    dtype=np.float32,
    with_labels: bool = False,
):
    """Fashion-MNIST flattened to ``[N, 784]``, dequantized: pixel ``k`` becomes
    ``(k + u) / 256`` with ``u ~ U(0, 1)``, so values lie in ``(0, 1)`` (the FD-SSM and SSM
    papers' dequantization). ``n_train`` / ``n_test`` keep the first images of a fixed random
    permutation of each split. Returns ``(train, test)`` or ``(train, test, train_labels,
    test_labels)``.

    Without the data (neither ``path``, ``$PPL_SCORE_DATA`` nor the Debian package holds the
    idx files) the script ends by :func:`exit_with_error` with the loader's message (where it
    looked, how to get the data), not a ``FileNotFoundError`` traceback."""
    rng = np.random.default_rng([seed, 14])
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        try:
            images, labels = load_fashion_mnist(split, path, flatten=True, dtype=np.float64)
        except FileNotFoundError as err:
            exit_with_error(str(err))
        idx = rng.permutation(len(images))[: (len(images) if n is None else n)]
        pixels = np.rint(images[idx] * 255.0)
        out.append(((pixels + rng.uniform(size=pixels.shape)) / 256.0).astype(dtype))
        out.append(labels[idx])
    train, train_labels, test, test_labels = out
    return (train, test, train_labels, test_labels) if with_labels else (train, test)


def to_logit(x: np.ndarray, alpha: float = 1e-6) -> np.ndarray:
    """``logit(alpha + (1 - 2 alpha) x)``: the logit space of the flow and EBM papers."""
    y = alpha + (1 - 2 * alpha) * np.asarray(x, dtype=np.float64)
    return np.log(y) - np.log1p(-y)


def from_logit(y: np.ndarray, alpha: float = 1e-6) -> np.ndarray:
    """Inverse of :func:`to_logit`, clipped to ``[0, 1]``."""
    x = (1.0 / (1.0 + np.exp(-np.asarray(y, dtype=np.float64))) - alpha) / (1 - 2 * alpha)
    return np.clip(x, 0.0, 1.0)
