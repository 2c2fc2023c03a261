"""Train state, optimizer and the sharded, jitted train step.

The step is one `jax.jit` with NamedSharding in/out shardings and a donated state. Randomness is derived from
(seed, micro-step) only, so a resumed run draws exactly the numbers the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

import sana_jax
from sana_jax import optim
from sana_jax.layer_stack import stack_layers
from sana_jax.model import compute_copies
from sana_jax.ops import TRANSFORMER_COMPILER_OPTIONS
from sana_jax.train import sharding
from sana_jax.train.config import TrainConfig
from sana_jax.train.flow import flow_matching_loss


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 []: micro-steps done (optimizer steps * grad_accum)
    params: Any  # fp32 master params (a plain tree, sana_jax layout)
    opt_state: Any
    ema: Any  # EMA of params, or None


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> CAME / CAME-8bit / AdamW with linear warmup to a constant lr; MultiSteps if accum.

    CAME takes the clipping as its `max_grad_norm` (the same function as chaining optax.clip_by_global_norm in
    front, without a pass over the gradients of its own)."""
    o = cfg.optim
    lr = optax.warmup_constant_schedule(0.0, cfg.effective_lr, max(o.warmup_steps, 1)) if o.warmup_steps else \
        cfg.effective_lr
    came_args = dict(weight_decay=o.weight_decay, layer_group=o.layer_group or None,
                     max_grad_norm=o.clip_grad_norm or None, impl=o.came_impl)
    if o.name == "came":
        tx = optim.came(lr, **came_args)
    elif o.name == "came_8bit":
        tx = optim.came_8bit(lr, **came_args)
    elif o.name == "adamw":
        tx = optax.adamw(lr, weight_decay=o.weight_decay)
        tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx) if o.clip_grad_norm else tx
    else:
        raise ValueError(f"optim.name must be came, came_8bit or adamw, got {o.name!r}")
    return optax.MultiSteps(tx, every_k_schedule=o.grad_accum) if o.grad_accum > 1 else tx


def state_shardings(cfg: TrainConfig, mesh: Mesh, tx: optax.GradientTransformation):
    """(abstract TrainState, TrainState of NamedSharding): params from the model's logical axes, optimizer state
    derived from them (reduced axes replicated), EMA like params, step replicated."""
    model = sana_jax.SanaTransformer(cfg.model)
    abstract_params = sana_jax.abstract_params(model)
    param_axes = sana_jax.logical_axes(model)
    param_sh = sharding.logical_to_sharding(mesh, param_axes)
    opt_axes = optim.state_axes(tx, abstract_params, param_axes)
    opt_sh = sharding.logical_to_sharding(mesh, opt_axes)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=jax.eval_shape(tx.init, abstract_params),
                          ema=abstract_params if cfg.optim.ema_decay else None)
    shardings = TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh,
                           ema=param_sh if cfg.optim.ema_decay else None)
    sharding.check_divisible(abstract.params, shardings.params)
    return abstract, shardings


def init_state(cfg: TrainConfig, tx, shardings: TrainState, params=None) -> TrainState:
    """A sharded TrainState: the original SANA init (seeded by cfg.seed) or the given params (fine-tuning)."""
    model = sana_jax.SanaTransformer(cfg.model)

    def build(p):
        if p is None:
            p = sana_jax.init_params(model, jax.random.key(cfg.seed))
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          ema=p if cfg.optim.ema_decay else None)

    if params is None:
        return jax.jit(lambda: build(None), out_shardings=shardings)()
    params = jax.device_put(params, shardings.params)
    return jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def narrow_gradients(cfg: TrainConfig) -> bool:
    """Whether the step differentiates the model's 16-bit compute copies of its weights (model.compute_copies),
    handing the optimizer 16-bit gradients: half the bytes to write and read, the same update. Only where the
    optimizer reads them at that width: CAME's Pallas kernels, without accumulation (optax.MultiSteps averages in
    the gradients' dtype). Elsewhere it differentiates the fp32 params. Called while tracing, under the mesh."""
    o = cfg.optim
    return o.name in ("came", "came_8bit") and o.grad_accum == 1 and \
        optim.reads_narrow_gradients(o.came_impl, o.layer_group)


def per_layer_value_and_grad(loss_fn, params, stack_impl: str = "auto"):
    """jax.value_and_grad(loss_fn)(params) for a model whose blocks are unrolled, with the blocks' gradients
    differentiated layer by layer and stacked by `layer_stack.stack_layers`.

    The unrolled scan stacks its layers' weight gradients with a concatenate of `depth` operands, which XLA:GPU
    emits slowly (sana_jax.layer_stack). Differentiated with respect to each layer's slice of the [depth, ...]
    blocks instead (stacked again inside the loss, which XLA folds into the scan's own slicing), the gradients come
    out per layer, and the stacking is the copy kernel's."""
    blocks = params["blocks"]
    depth = jax.tree.leaves(blocks)[0].shape[0]
    rest = {name: value for name, value in params.items() if name != "blocks"}
    layers = [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(depth)]

    def loss_of_layers(rest, layers):
        return loss_fn({**rest, "blocks": jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)})

    loss, (rest_grads, layer_grads) = jax.value_and_grad(loss_of_layers, argnums=(0, 1))(rest, layers)
    stacked = jax.tree.map(lambda *grads: stack_layers(grads, stack_impl), *layer_grads)
    return loss, {**rest_grads, "blocks": stacked}


def train_step(cfg: TrainConfig, tx):
    """step(state, batch) -> (state, metrics {loss, grad_norm}), not jitted: make_train_step jits it under the
    mesh and the logical axis rules, which it needs when traced."""
    model = sana_jax.SanaTransformer(cfg.model)
    seed_key = jax.random.key(cfg.seed + 1)

    def apply_fn(params, x, t, y, mask):
        return model.apply({"params": params}, x, t, y, mask)

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(seed_key, state.step)
        loss_fn = lambda p: flow_matching_loss(apply_fn, p, batch, rng, cfg.flow)  # noqa: E731
        narrow = narrow_gradients(cfg)
        params = compute_copies(cfg.model, state.params) if narrow else state.params
        if narrow and cfg.model.unroll_blocks:
            loss, grads = per_layer_value_and_grad(loss_fn, params)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if cfg.optim.ema_decay:
            decay = cfg.optim.ema_decay
            updated = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else True
            ema = jax.tree.map(lambda e, p: jnp.where(updated, decay * e + (1 - decay) * p, e), ema, params)
        metrics = {"loss": loss, "grad_norm": optim.global_norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return step


def make_train_step(cfg: TrainConfig, mesh: Mesh, tx, shardings: TrainState, batch_shapes: dict):
    """jit(step)(state, batch) -> (state, metrics {loss, grad_norm}); state donated."""
    batch_sh = {k: (sharding.replicated(mesh) if k == "null_y" else sharding.batch_sharding(mesh, len(shape)))
                for k, shape in batch_shapes.items()}
    jitted = jax.jit(train_step(cfg, tx), in_shardings=(shardings, batch_sh),
                     out_shardings=(shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,), compiler_options=TRANSFORMER_COMPILER_OPTIONS)

    def run(state, batch):
        with nn.logical_axis_rules(sharding.LOGICAL_RULES), jax.set_mesh(mesh):
            return jitted(state, batch)

    return run, batch_sh


def put_batch(batch: dict, batch_sh: dict[str, NamedSharding]) -> dict:
    """Host numpy batch (this process's rows) -> global arrays sharded over the batch axes."""
    out = {}
    for key, value in batch.items():
        sh = batch_sh[key]
        if jax.process_count() == 1 or key == "null_y":
            out[key] = jax.device_put(value, sh)
        else:
            global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
            out[key] = jax.make_array_from_process_local_data(sh, value, global_shape)
    return out
