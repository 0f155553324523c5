"""``vitx finetune`` with more than one worker: N workers with per-worker batch b take the steps of one
process with batch N*b (same weights to 1e-5, same logged losses) in torch (DDP, FSDP2), Flax (a
device mesh in one process, with and without --fsdp; jax.distributed across processes) and
TensorFlow (MultiWorkerMirroredStrategy across processes, MirroredStrategy over two logical CPU
devices); a 2-worker run stopped after its first epoch resumes to the weights of an uninterrupted one.

No shuffle, no augmentation, dropout 0 and a checkpoint without qkv biases (the attention key
biases have a zero true gradient, which AdamW turns into amplified rounding noise). 45 training
images in global batches of 8: the last batch of each epoch (5 images) splits 3 + 2.
Every worker binds to 127.0.0.1; every subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from conversion.finetune import FinetuneOptions, finetune
from conversion.frameworks import unavailable
from vit_core.checkpoint.files import read_state_dict
from vit_core.training import part_bounds

from tests.test_finetune import crop_task, read_log, seeded_checkpoint

ROOT = pathlib.Path(__file__).parent.parent
WEIGHT_ATOL = 1e-5  # the bound on the final weights
LOSS_ATOL = 1e-6    # every logged step's loss (float32 rounding of the summed means: ~1e-7)
TIMEOUT = 120
RECIPE = dict(epochs=2, lr=1e-3, weight_decay=0.05, warmup_steps=2, val_split=0.25, augment=False, shuffle=False)


def needs(framework: str) -> Any:
    return pytest.mark.skipif(unavailable(framework) is not None, reason=f"{framework} is not installed")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path_factory.mktemp("dist")
    return crop_task(root / "photos", per_class=12), seeded_checkpoint(root / "ckpt", seed=3, qkv_bias=False)


_references: dict[str, pathlib.Path] = {}


def reference(framework: str, task: tuple[pathlib.Path, pathlib.Path], tmp_path_factory: pytest.TempPathFactory
              ) -> pathlib.Path:
    """One process, batch 8: the run two workers of batch 4 must reproduce (computed once per framework)."""
    if framework not in _references:
        out = tmp_path_factory.mktemp(f"ref-{framework}") / "out"
        finetune(FinetuneOptions(str(task[0]), str(task[1]), str(out), framework=framework, batch_size=8,
                                 log=f"{out}.jsonl", quiet=True, **RECIPE))
        _references[framework] = out
    return _references[framework]


def cli_args(task: tuple[pathlib.Path, pathlib.Path], framework: str, out: pathlib.Path, *extra: str) -> list[str]:
    return ["finetune", str(task[0]), "--model", str(task[1]), "--output", str(out), "--framework", framework,
            "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--weight-decay", "0.05", "--warmup-steps", "2",
            "--val-split", "0.25", "--no-augment", "--no-shuffle", "--log", f"{out}.jsonl", "--collective-timeout",
            "60", "-q", *extra]


def run(argv: list[str], env: dict[str, str] | None = None, prelude: str = "") -> int:
    """``python -m conversion.cli ARGV`` (or ``prelude`` then conversion.cli.main) in a subprocess, bounded in time."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    code = f"import sys\n{prelude}\nfrom conversion.cli import main\nsys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, *argv], env=environment, start_new_session=True)
    try:
        return process.wait(timeout=TIMEOUT)
    finally:  # the launcher's workers too, whatever happened
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def compare(expected: pathlib.Path, got: pathlib.Path, what: str) -> tuple[float, float]:
    a, b = read_state_dict(expected / "model.safetensors"), read_state_dict(got / "model.safetensors")
    assert sorted(a) == sorted(b)
    weights = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    la = np.array([e["loss"] for e in read_log(pathlib.Path(f"{expected}.jsonl"))])
    lb = np.array([e["loss"] for e in read_log(pathlib.Path(f"{got}.jsonl"))])
    assert len(la) == len(lb) == 12, (len(la), len(lb))
    assert [e["step"] for e in read_log(pathlib.Path(f"{got}.jsonl"))] == list(range(1, 13))
    losses = float(np.max(np.abs(la - lb)))
    print(f"{what}: weights max |diff| {weights:.2e}, losses max |diff| {losses:.2e}")
    assert weights <= WEIGHT_ATOL, f"{what}: weights differ by {weights:.2e} from one process with batch 8"
    assert losses <= LOSS_ATOL, f"{what}: logged losses differ by {losses:.2e}"
    ma = json.loads((expected / "metrics.json").read_text())
    mb = json.loads((got / "metrics.json").read_text())
    assert [e["val_accuracy"] for e in ma["epochs"]] == [e["val_accuracy"] for e in mb["epochs"]]
    assert mb["val_images"] == 15 and mb["train_images"] == 45
    assert np.allclose([e["val_loss"] for e in ma["epochs"]], [e["val_loss"] for e in mb["epochs"]], atol=1e-5)
    return weights, losses


def test_parts_of_a_global_batch() -> None:
    assert part_bounds(8, 2).tolist() == [0, 4, 8]
    assert part_bounds(5, 2).tolist() == [0, 3, 5]
    assert part_bounds(1, 3).tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError):
        part_bounds(4, 0)


# ------------------------------------------------------------------------------ torch
@needs("torch")
def test_torch_ddp_two_workers_match_one_and_resume(task: Any, tmp_path: pathlib.Path,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """--nproc 2 (torchrun, DDP on gloo) with batch 4 = one process with batch 8; stopped after epoch 1
    and resumed (--resume, 2 workers), the same weights as the uninterrupted 2-worker run, bit for bit."""
    expected = reference("torch", task, tmp_path_factory)
    whole = tmp_path / "ddp"
    assert run(cli_args(task, "torch", whole, "--nproc", "2")) == 0
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["data_parallel"] == {"workers": 2, "processes": 2, "global_batch_size": 8, "fsdp": False}
    compare(expected, whole, "torch DDP 2 processes")

    stopped = tmp_path / "stopped"
    assert run(cli_args(task, "torch", stopped, "--nproc", "2", "--stop-after-steps", "8")) == 130
    state = json.loads((stopped / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == 6 and state["run"]["data_parallel_workers"] == 2
    assert run(cli_args(task, "torch", stopped, "--nproc", "2", "--resume")) == 0
    a, b = read_state_dict(whole / "model.safetensors"), read_state_dict(stopped / "model.safetensors")
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) == 0.0
    assert read_log(pathlib.Path(f"{stopped}.jsonl")) == read_log(pathlib.Path(f"{whole}.jsonl"))


@needs("torch")
def test_torch_fsdp_two_workers_match_one(task: Any, tmp_path: pathlib.Path,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    expected = reference("torch", task, tmp_path_factory)
    out = tmp_path / "fsdp"
    assert run(cli_args(task, "torch", out, "--nproc", "2", "--fsdp")) == 0
    assert json.loads((out / "metrics.json").read_text())["data_parallel"]["fsdp"] is True
    compare(expected, out, "torch FSDP2 2 processes")


# ------------------------------------------------------------------------------ flax
@needs("flax")
def test_flax_mesh_of_two_devices_matches_one(task: Any, tmp_path: pathlib.Path,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """One process, two XLA CPU devices: batch sharded (parameters replicated, then --fsdp sharded)."""
    expected = reference("flax", task, tmp_path_factory)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    # both runs in one process (one start of jax): the first through main() before the second
    first = f"from conversion.cli import main as first\nassert first({cli_args(task, 'flax', tmp_path / 'mesh')!r}) == 0"
    assert run(cli_args(task, "flax", tmp_path / "mesh-fsdp", "--fsdp"), env=env, prelude=first) == 0
    for name, extra in (("mesh", []), ("mesh-fsdp", ["--fsdp"])):
        out = tmp_path / name
        parallel = json.loads((out / "metrics.json").read_text())["data_parallel"]
        assert parallel == {"workers": 2, "processes": 1, "global_batch_size": 8, "fsdp": bool(extra)}
        compare(expected, out, f"flax {name} 1 process x 2 devices")


@needs("flax")
def test_flax_jax_distributed_two_processes_match_one(task: Any, tmp_path: pathlib.Path,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    expected = reference("flax", task, tmp_path_factory)
    out = tmp_path / "jaxdist"
    assert run(cli_args(task, "flax", out, "--nproc", "2")) == 0
    assert json.loads((out / "metrics.json").read_text())["data_parallel"]["processes"] == 2
    compare(expected, out, "flax jax.distributed 2 processes")


# ------------------------------------------------------------------------------ tf
@needs("tf")
def test_tf_multi_worker_mirrored_two_processes_match_one(task: Any, tmp_path: pathlib.Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    expected = reference("tf", task, tmp_path_factory)
    out = tmp_path / "mwms"
    assert run(cli_args(task, "tf", out, "--nproc", "2")) == 0
    assert json.loads((out / "metrics.json").read_text())["data_parallel"]["processes"] == 2
    compare(expected, out, "tf MultiWorkerMirroredStrategy 2 processes")


@needs("tf")
def test_tf_mirrored_two_logical_devices_match_one(task: Any, tmp_path: pathlib.Path,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    expected = reference("tf", task, tmp_path_factory)
    out = tmp_path / "mirrored"
    prelude = ("import tensorflow as tf\ncpu = tf.config.list_physical_devices('CPU')[0]\n"
               "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)")
    assert run(cli_args(task, "tf", out), prelude=prelude) == 0
    parallel = json.loads((out / "metrics.json").read_text())["data_parallel"]
    assert parallel == {"workers": 2, "processes": 1, "global_batch_size": 8, "fsdp": False}
    compare(expected, out, "tf MirroredStrategy 1 process x 2 devices")


# ------------------------------------------------------------------------------ launcher
@needs("torch")
def test_failing_worker_ends_the_run_with_its_exit_code(task: Any, tmp_path: pathlib.Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """A user error in the workers: the run exits 2 (the workers' code) with their one-line message."""
    from conversion.cli import main

    assert main(cli_args(task, "flax", tmp_path / "x", "--nproc", "0")) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert run(cli_args(task, "torch", tmp_path / "taken", "--nproc", "2")) == 2
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("codes, expected", [
    ([-15, 130], 130),   # rank 1 stopped by itself first, the launcher then SIGTERMed rank 0
    ([130, -15], 130),
    ([130, 2], 130),     # both on their own: the first by rank
    ([-15, -9], 137),    # killed by another signal (the OOM killer) before the launcher's SIGTERM
    ([-15, -15], 143),
    ([0, None, 3], 3),
    ([0, 0], 1),         # a failure with no failing worker's code
])
def test_the_runs_exit_code_is_the_worker_that_failed_on_its_own(codes: list[int | None], expected: int) -> None:
    from conversion.distributed import _exit_code

    assert _exit_code(codes) == expected


def test_launcher_stops_every_worker_when_one_fails(tmp_path: pathlib.Path) -> None:
    """conversion.distributed._run_workers: the first failing worker's exit code, the others stopped;
    a worker's output is shown when it fails."""
    from conversion.distributed import _run_workers

    sleeper = tmp_path / "sleeper.pid"
    started = time.monotonic()
    code = _run_workers([[sys.executable, "-c", f"import os, time; open({str(sleeper)!r}, 'w').write(str(os.getpid())); "
                                                "time.sleep(60)"],
                         [sys.executable, "-c", "import sys, time; time.sleep(1); print('worker 1 gives up'); sys.exit(3)"]],
                        [{}, {}])
    assert code == 3 and time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):
        os.kill(int(sleeper.read_text()), 0)
    assert _run_workers([[sys.executable, "-c", "pass"]] * 2, [{}, {}]) == 0


def test_terminated_launcher_stops_its_workers(tmp_path: pathlib.Path) -> None:
    """SIGTERM (or Ctrl-C) to the launcher: every worker is stopped and the launcher exits 130."""
    pids = tmp_path / "pids"
    pids.mkdir()
    worker = f"import os, time; open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').close(); time.sleep(60)"
    code = ("import sys\nfrom conversion.distributed import _run_workers\n"
            f"sys.exit(_run_workers([[sys.executable, '-c', {worker!r}]] * 2, [{{}}, {{}}]))")
    launcher = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2:
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 130
    for pid in pids.iterdir():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid.name), 0)
