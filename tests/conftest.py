"""Pin precision for every framework before any test runs (docs/NUMERICS.md)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import sys  # noqa: E402

import pytest  # noqa: E402

# Process-wide settings that change how GEMMs round: a test that leaves one changed makes the
# next tests in its xdist worker compute differently from the subprocesses they compare with
# (a resume test's killed run against its in-process uninterrupted run, say).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@pytest.fixture(autouse=True)
def _no_thread_setting_leaks():
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    variables = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    yield
    problems = []
    if threads is not None and torch.get_num_threads() != threads:
        problems.append(f"torch threads {threads} -> {torch.get_num_threads()}")
        torch.set_num_threads(threads)
    for name, value in variables.items():
        if os.environ.get(name) != value:
            problems.append(f"{name} {value!r} -> {os.environ.get(name)!r}")
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if problems:
        pytest.fail("the test left process-wide thread settings changed (restored now): " + "; ".join(problems),
                    pytrace=False)
