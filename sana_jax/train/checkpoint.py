"""Orbax checkpoints of the TrainState: async, keep-N, restored onto any mesh, never a bad one over a good one.

Each step folder holds two items: `state` (the sharded TrainState, orbax StandardSave) and `meta` (JSON: the
training config, step, loss). Orbax writes into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact; a state with a non-finite loss is refused before any write.
"""

from __future__ import annotations

import math
import os

import jax
import orbax.checkpoint as ocp

from sana_jax.train.step import TrainState


class Checkpoints:
    def __init__(self, directory: str, keep: int, every: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict, force: bool = False) -> bool:
        loss = meta.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss {loss} is not finite; refusing to checkpoint this state "
                                     f"(the last good checkpoint in {self.directory} is kept)")
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def meta(self, step: int) -> dict:
        """The JSON item alone (config, losses), read before any array so a mismatch is reported cleanly."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
        """Restore `step` directly into `shardings` (any mesh); mismatched shapes raise naming the leaf."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                          meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise ValueError(f"{self.directory} step {step}: checkpoint does not match this model/optimizer "
                             f"config: {err}") from err
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
