"""The separate virtual environment that holds the PyTorch peers: transformers 5.x and timm.

transformers 5 has no TensorFlow or Flax and cannot share the main .venv (which pins transformers
4.57.6 as the test oracle), so it lives in ``benchmarks/.venv-peers``, created plain (no system
site packages) by :func:`ensure_peers_venv` the first time the harness needs it.

- torch is pinned exactly to the main venv's version: an open range makes pip pull a multi-GB
  CUDA build, and the comparison must run the same torch as vitx-torch.
- timm is installed with ``--no-deps``: its dependencies are torch, pyyaml, huggingface_hub and
  safetensors (all present) plus torchvision, which ``timm.models.vision_transformer`` imports only
  for data transforms and is never installed here. ``benchmarks/stubs/torchvision`` is a stand-in
  put on the peers' PYTHONPATH for the benchmark run alone (see :func:`peers_env`).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

BENCH_DIR = pathlib.Path(__file__).resolve().parent
PEERS_VENV = BENCH_DIR / ".venv-peers"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
STUBS_DIR = BENCH_DIR / "stubs"
_STAMP = PEERS_VENV / ".installed-v2"

TORCH_PIN = "torch==2.13.0"
PEER_REQUIREMENTS = [TORCH_PIN, "transformers>=5,<6", "safetensors", "numpy", "pyyaml", "huggingface_hub",
                     "pillow"]  # pillow: timm.data imports PIL at module level
TIMM_PIN = "timm>=1.0,<2"


def ensure_peers_venv(log: bool = True) -> pathlib.Path:
    """Create ``benchmarks/.venv-peers`` and install the peers once; return its python.

    Raises RuntimeError with pip's output when the installation fails (for example offline).
    """
    if _STAMP.exists() and PEERS_PYTHON.exists():
        return PEERS_PYTHON
    if log:
        print(f"[bench] creating {PEERS_VENV} (transformers 5.x + timm, torch pinned)...", file=sys.stderr, flush=True)
    if not PEERS_PYTHON.exists():
        # The interpreter that runs the harness, not the main .venv's symlink target guess.
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(PEERS_VENV)])
    pip = [str(PEERS_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(pip + PEER_REQUIREMENTS)
    _run(pip + ["--no-deps", TIMM_PIN])
    _STAMP.write_text("ok\n")
    return PEERS_PYTHON


def peers_env(base_env: dict[str, str]) -> dict[str, str]:
    """The environment for a child run in the peers venv: the repo (for ``benchmarks.*``) and the
    torchvision stub on PYTHONPATH, nothing of the main venv."""
    env = dict(base_env)
    env.pop("VIRTUAL_ENV", None)
    repo = str(BENCH_DIR.parent)
    env["PYTHONPATH"] = os.pathsep.join([repo, str(STUBS_DIR)])
    return env


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    print(ensure_peers_venv())
