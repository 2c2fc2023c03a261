"""Multi-host training: 2 processes on localhost (jax.distributed with a local coordinator, CPU collectives over
gloo) run the real `train()` and agree with each other and with one process holding the same 2 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sana_jax.train import sharding
from sana_jax.train.checkpoint import Checkpoints
from sana_jax.train.config import MeshConfig, OptimConfig, TrainConfig
from sana_jax.train.data import Loader
from sana_jax.train.loop import _host_batch
from sana_jax.train.step import make_optimizer, state_shardings
from tests.helpers import assert_close
from tests.test_train import MODEL, cache, tiny_config  # noqa: F401 (cache: the shared shapes-cache fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # a hung coordinator or collective fails the test instead of blocking CI

_RUN = """
import json, sys, time
start = time.perf_counter()
import jax
# Cross-process collectives on CPU: gloo over TCP (jax 0.10's default, named so another default cannot change it).
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, cache, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if process_id >= 0:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
from tests.test_distributed import distributed_config
from sana_jax.train.loop import train
assert jax.device_count() == 2, jax.devices()
result = train(distributed_config(cache, out), progress=False)
# The final weights as this run holds them (every process gathers its shards), for the checkpoint comparison.
from jax.experimental import multihost_utils
import numpy as np
final = multihost_utils.process_allgather((result.state.params, result.state.ema), tiled=True)
if jax.process_index() == 0:
    np.save(out + "/final.npy", np.concatenate([np.ravel(x) for x in jax.tree.leaves(final)]))
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "losses": result.losses,
                  "seconds": time.perf_counter() - start}))
"""


def distributed_config(cache, out_dir) -> TrainConfig:
    # fsdp 2 over the 2 processes: every weight is split between the hosts, so each writes its own checkpoint
    # shards, and the batch is split between them. CAME at lr 1e-4 as tests/test_train.py's sharded runs (noise
    # from summation order stays ~1e-7 there); EMA on, so the end-of-run sample grid uses the EMA weights.
    return tiny_config(cache, out_dir, model=MODEL.replace(depth=1), steps=4, checkpoint_every=2,
                       mesh=MeshConfig(data=1, fsdp=2),
                       optim=OptimConfig(name="came", lr=1e-4, warmup_steps=2, clip_grad_norm=0.1, ema_decay=0.9),
                       sample_count=4, sample_steps=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(name: str, args: list[str], devices: int, log_dir) -> tuple[subprocess.Popen, str, str]:
    # The device count is set in the subprocess only; LLVM -O0 cuts CPU compile time by about a third and is the
    # same in every run compared here.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    out, err = os.path.join(log_dir, f"{name}.out"), os.path.join(log_dir, f"{name}.err")
    with open(out, "w") as fo, open(err, "w") as fe:  # files, not pipes: a full pipe cannot stall a process
        proc = subprocess.Popen([sys.executable, "-c", _RUN, *args], env=env, cwd=ROOT, stdout=fo, stderr=fe)
    return proc, out, err


def _results(runs) -> list[dict]:
    """Wait for every run (one shared deadline), then fail with each failed run's stderr, or parse its result."""
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    for proc, _, _ in runs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    for proc, _, _ in runs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    failed = [(proc, err) for proc, _, err in runs if proc.returncode != 0]
    if timed_out or failed:
        report = "\n".join(f"--- {os.path.basename(err)} (exit {proc.returncode}):\n"
                           f"{open(err).read()[-4000:]}" for proc, err in failed)
        pytest.fail(f"{'timed out after ' + str(TIMEOUT_S) + ' s; ' if timed_out else ''}subprocess failure\n{report}")
    return [json.loads(open(out).read().strip().splitlines()[-1]) for _, out, _ in runs]


def _restore_params(cfg: TrainConfig):
    """The final checkpoint's params and EMA restored onto this process's single device."""
    cfg = tiny_config(cfg.data_dir, cfg.out_dir, model=cfg.model, optim=cfg.optim)  # default mesh: all local devices
    mesh = sharding.make_mesh(cfg.mesh)
    abstract, shardings = state_shardings(cfg, mesh, make_optimizer(cfg))
    checkpoints = Checkpoints(os.path.join(cfg.out_dir, "checkpoints"), 3, every=1)
    try:
        state, _ = checkpoints.restore(checkpoints.latest_step(), abstract, shardings)
    finally:
        checkpoints.close()
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves((state.params, state.ema))])


def test_two_processes_train_as_one(cache, tmp_path):
    port = _free_port()
    multi, single = tmp_path / "two-processes", tmp_path / "one-process"
    runs = [_launch(f"process{i}", [str(port), str(i), cache, str(multi)], 1, tmp_path) for i in range(2)]
    runs.append(_launch("single", ["0", "-1", cache, str(single)], 2, tmp_path))
    first, second, reference = _results(runs)
    print(f"subprocess seconds: {first['seconds']:.1f}, {second['seconds']:.1f} (2 processes), "
          f"{reference['seconds']:.1f} (1 process)")

    assert (first["process"], second["process"], first["processes"], reference["processes"]) == (0, 1, 2, 1)
    assert first["losses"] == second["losses"]  # one global computation: both hosts fetch the same numbers
    steps = [s for s, _ in reference["losses"]]
    assert [s for s, _ in first["losses"]] == steps == [1, 2, 3, 4]
    assert_close("2 processes x 1 device vs 1 process x 2 devices, losses",
                 np.array([v for _, v in reference["losses"]]), np.array([v for _, v in first["losses"]]),
                 "multiprocess_fp32")

    # orbax wrote each host's shards of the fsdp-split state; the checkpoint restores onto one device.
    for step in (2, 4):
        state_dir = multi / "checkpoints" / str(step) / "state"
        assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
    assert_close("2-process checkpoint (params, EMA) restored on 1 device vs the run's final weights",
                 np.load(multi / "final.npy"), _restore_params(distributed_config(cache, multi)), "roundtrip")
    # process 0 alone writes the files of the run (loss curve, history, sample grid).
    for name in ("loss.png", "losses.json", "samples/step-0000004.png"):
        assert (multi / name).exists(), name


def test_host_rows_sit_at_their_single_host_positions(cache):
    """The row-to-position map the step draws its noise from (`_host_batch`'s index) matches the Loader's split:
    rows of process p land at the positions the single-host batch holds them in."""
    whole = Loader(cache, 8, seed=3).batch(5)
    for p in range(2):
        part = _host_batch(Loader(cache, 8, seed=3, process_index=p, process_count=2), 5)
        np.testing.assert_array_equal(part["x0"], whole["x0"][part["index"]])
        np.testing.assert_array_equal(part["y"], whole["y"][part["index"]])
