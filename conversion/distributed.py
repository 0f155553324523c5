"""More than one process for ``vitx finetune``: how a global batch is split, which process is
rank 0, and ``--nproc N``, which starts N local workers with each framework's own launcher.

The split (docs/training.md, "More than one process"): ``--batch-size`` is the batch of one worker,
so N workers take global batches of N * batch-size images, the batches a single process with
``--batch-size N*b`` takes. The global batch of step s is the same list of images whatever the
number of workers; worker r takes its contiguous part of it (:func:`part_bounds`: equal parts
when the batch divides, else parts that differ by at most one image, e.g. in an epoch's last
batch).

Launchers (one machine, 127.0.0.1 only):

- torch: ``torch.distributed.run`` (torchrun ``--standalone``) runs the workers; each reads its
  rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``).
- jax: N processes with ``--coordinator-address 127.0.0.1:PORT --num-processes N --process-id I``
  (``jax.distributed.initialize``).
- tf: N processes, each with a ``TF_CONFIG`` naming every worker's 127.0.0.1 port and its own index
  (``tf.distribute.MultiWorkerMirroredStrategy``).

The parent streams rank 0's output, stops every worker when one fails or on Ctrl-C, and exits
with the failing worker's exit code. Every worker sets its collective and initialisation
timeouts to ``--collective-timeout`` seconds, so a lost worker ends the run instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence

from vit_core.training import part_bounds

__all__ = ["DEFAULT_TIMEOUT", "launch", "part_bounds", "rank_from_environment", "tf_config"]

# seconds a collective (or the workers' first meeting) may wait for the others
DEFAULT_TIMEOUT = 600.0
# seconds the other workers get to stop (SIGTERM) before they are killed
_GRACE = 10.0


def rank_from_environment() -> tuple[int, int]:
    """(rank, world size) as the launchers announce them: torchrun's ``RANK``/``WORLD_SIZE``, or
    ``TF_CONFIG``'s task index and worker count; (0, 1) when neither is set."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if os.environ.get("TF_CONFIG"):
        config = json.loads(os.environ["TF_CONFIG"])
        workers = config.get("cluster", {}).get("worker", [])
        return int(config.get("task", {}).get("index", 0)), max(1, len(workers))
    return 0, 1


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (bound once, then released for the workers)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def tf_config(ports: Sequence[int], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` of a cluster of 127.0.0.1 workers on ``ports``."""
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def launch(framework: str, nproc: int, argv: Sequence[str]) -> int:
    """Run the ``vitx`` command line ``argv`` (``finetune ...``, ``--nproc`` among its arguments or not) in
    ``nproc`` local worker processes of ``framework``; the exit code of the run (the first failing worker's)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    worker_args = _without_nproc(argv)
    command = [sys.executable, "-m", "conversion.cli", *worker_args]
    if framework == "torch":
        return _launch_torch(nproc, command)
    if framework == "flax":
        if any(a == "--coordinator-address" or a.startswith("--coordinator-address=") for a in worker_args):
            raise ValueError("--nproc starts its own jax.distributed coordinator: leave out --coordinator-address, "
                             "--num-processes and --process-id")
        port = free_ports(1)[0]
        commands = [command + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(nproc),
                               "--process-id", str(i)] for i in range(nproc)]
        return _run_workers(commands, [{} for _ in range(nproc)])
    if framework == "tf":
        ports = free_ports(nproc)
        return _run_workers([command] * nproc, [{"TF_CONFIG": tf_config(ports, i)} for i in range(nproc)])
    raise ValueError(f"--framework must be one of torch, tf, flax, got {framework!r}")


def _launch_torch(nproc: int, command: list[str]) -> int:
    """torch's own launcher in this process: torchrun --standalone --nproc-per-node N --max-restarts 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # what torchrun --standalone sets (torch.distributed.run.run), bound to 127.0.0.1
    args = parse_args(["--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4()}",
                       f"--nproc-per-node={nproc}", "--max-restarts=0", "--monitor-interval=0.5",
                       "--no-python", "--", *command])
    config, entrypoint, entry_args = config_from_args(args)
    try:
        elastic_launch(config=config, entrypoint=entrypoint)(*entry_args)
    except ChildFailedError as e:
        return _exit_code([f.exitcode for _, f in sorted(e.failures.items())])
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def _exit_code(codes: Sequence[int | None]) -> int:
    """The run's exit code from its workers' (by rank; negative: killed by that signal), as a shell
    reports it (128 + the signal). After the first failure the launcher stops the other workers with
    SIGTERM, and a worker may end before another that failed on its own is seen: so a worker that exited
    by itself comes first, then one killed by another signal than SIGTERM, then by rank; 1 if none failed."""
    failed = [c for c in codes if c not in (0, None)]
    if not failed:
        return 1
    code = min(failed, key=lambda c: (c < 0, c == -signal.SIGTERM))  # min keeps the first of equals: by rank
    return 128 - code if code < 0 else code


def _run_workers(commands: list[list[str]], envs: list[dict[str, str]]) -> int:
    """Start one process per command; rank 0 writes to this terminal, the others to temporary files
    shown when they fail. Waits for all; on the first failure (or Ctrl-C) stops the others."""
    processes: list[subprocess.Popen] = []
    logs = []
    code = 0

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        for rank, (command, extra) in enumerate(zip(commands, envs)):
            env = {**os.environ, **extra}
            if rank == 0:
                processes.append(subprocess.Popen(command, env=env))
                logs.append(None)
            else:
                log = tempfile.TemporaryFile(mode="w+b")
                logs.append(log)
                processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        while True:
            codes = [p.poll() for p in processes]
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (0, None)]
            if failed:
                rank, code = failed[0]
                _stop(processes)
                log = logs[rank]
                if log is not None:
                    log.seek(0)
                    tail = log.read().decode("utf-8", "replace")[-4000:]
                    sys.stderr.write(f"vitx finetune: worker {rank} failed (exit code {code}):\n{tail}\n")
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(processes)
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(processes)
        for log in logs:
            if log is not None:
                log.close()
    return 128 - code if code < 0 else code


def _stop(processes: list[subprocess.Popen]) -> None:
    alive = [p for p in processes if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _GRACE
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
