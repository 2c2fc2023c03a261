"""SANA's samplers in JAX: flow DPM-Solver++ (2M), flow Euler and SANA-Sprint's sCM (TrigFlow), each one `lax.scan`.

    x0 = sample(velocity_fn, noise, method="flow_dpm_solver", steps=20, flow_shift=3.0)

`velocity_fn(x, timestep)` gets `x` shaped like `noise` (any layout: the samplers are elementwise) and `timestep`
`[B]` float32 on the 0..1000 scale, and returns the flow velocity v = d x / d sigma (x_sigma = (1 - sigma) x0 +
sigma * noise). Classifier-free or embedded guidance is the velocity function's business (see `pipeline`).

The schedules are computed on the host (`make_schedule`: numpy, from static `steps` and `flow_shift`) and the loop
(`run_schedule`) is one `lax.scan` whose body calls `velocity_fn` once: `velocity_fn` is traced once whatever the
step count, and `sample` can run inside `jax.jit`. A jitted caller that passes the `Schedule` as an argument
(as `pipeline` does) compiles once per method and step count, whatever the shift or timestep convention.

Timestep conventions (`timestep_convention`): what `velocity_fn` receives. The sigma grids are the same in all
three (computed as diffusers computes them; SANA's own fp32 grid arithmetic differs by <= 1.2e-7).

| method            | "sana" (default)          | "diffusers"                    | "continuous"         |
|-------------------|---------------------------|--------------------------------|----------------------|
| flow_dpm_solver   | floor(1000 sigma)         | floor(1000 sigma) (int64 cast) | 1000 sigma (float)   |
| flow_euler        | floor(1000 sigma)         | 1000 sigma (float32)           | 1000 sigma (float)   |
| scm               | 1000 t, t = sin s / (sin s + cos s), never truncated (Sprint divides by 1000) |

- "sana" is what the released SANA / SANA-1.5 transformers embed: the original samplers pass the float 1000 t and
  `SanaMS.forward` truncates it with `timestep.long()` (reference/sana-original.md §1.2). Our model embeds t as
  given, so the sampler truncates instead.
- "diffusers" is what diffusers' schedulers hand `SanaTransformer2DModel`: `DPMSolverMultistepScheduler` casts
  1000 sigma to int64, `FlowMatchEulerDiscreteScheduler` keeps float32.
- "continuous" is what SANA's sampler code passes before the model's own truncation; the golden trajectories in
  `shared/fixtures/samplers_original.safetensors` (whose velocity uses t as passed) are reproduced with it.

Differences from SANA's own code kept on purpose (all below the fp32 parity targets, see tests/test_sampling.py):
the DPM data prediction is x - sigma v (diffusers) instead of SANA's (x - t eps)/(1 - t), which cancels
catastrophically at t ~ 0.9997 (2.7e-4 relative on the first x0); SANA's `FlowEuler` hard-codes shift 3.0 whatever
the config, here `flow_shift` is used (pass 3.0 to reproduce it).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

Method = Literal["flow_dpm_solver", "flow_euler", "scm"]
TimestepConvention = Literal["sana", "diffusers", "continuous"]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

METHODS: tuple[str, ...] = get_args(Method)
TIMESTEP_CONVENTIONS: tuple[str, ...] = get_args(TimestepConvention)
# scripts/inference.py `sample_steps_dict` (flow_dpm-solver 20, flow_euler 28); Sprint's pipeline default 2.
DEFAULT_STEPS = {"flow_dpm_solver": 20, "flow_euler": 28, "scm": 2}
NUM_TRAIN_TIMESTEPS = 1000
# SANA-Sprint (app/sana_sprint_pipeline.py, diffusers SCMScheduler): TrigFlow time grid and noise scale.
SCM_MAX_TIMESTEP = 1.57080  # slightly above pi/2: cos(s) = -3.6e-6 in fp32, kept as released
SCM_INTERMEDIATE_TIMESTEP = 1.3  # the middle point of the 2-step schedule
SIGMA_DATA = 0.5


class Schedule(NamedTuple):
    """A sampler's host-side schedule, all float32 numpy (`make_schedule`; a pytree, so it can be a jit argument).

    grid: [N+1] sigma grid (flow methods, last entry 0) or TrigFlow times s (scm, last entry 0).
    timesteps: [N] the value `velocity_fn` receives at step i (0..1000 scale, per the timestep convention).
    coefficients: [N, K] per-step constants of the update (see `make_schedule`).
    """

    grid: np.ndarray
    timesteps: np.ndarray
    coefficients: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.timesteps)


class Trajectory(NamedTuple):
    """Every step of one sampling run (returned with `return_intermediates=True`).

    timesteps: [N] what `velocity_fn` received at each step (one value per call; the batch shares it).
    grid: [N+1] the sigma (or TrigFlow s) grid.
    x: [N+1, *noise.shape] x[0] is the sampler's start (noise; noise * sigma_data for scm), x[i] the state after
       step i (scm: the sigma_data-scaled latents, as diffusers' SCMScheduler holds them).
    x0: [N, *noise.shape] the data prediction of step i (x - sigma v; scm: the scheduler's pred_x0, scaled).
    """

    timesteps: jax.Array
    grid: jax.Array
    x: jax.Array
    x0: jax.Array


def _flow_dpm_sigmas64(steps: int, flow_shift: float) -> np.ndarray:
    """[steps] fp64 nonzero sigmas of flow DPM-Solver, before the fp32 rounding (diffusers derives int timesteps
    from these)."""
    sigmas = 1.0 - np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)
    return np.flip(flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas))[:-1]


def flow_dpm_sigmas(steps: int, flow_shift: float) -> np.ndarray:
    """[steps+1] float32 sigma grid of flow DPM-Solver: shift(1 - linspace(1, 1/1000, N+1)) reversed, last = 0.

    As diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True) computes it (fp64, then fp32); SANA's
    `time_uniform_flow` grid is the same formula in fp32: 0.99967 (shift 3) down to exactly 0.
    """
    return np.concatenate([_flow_dpm_sigmas64(steps, flow_shift), [0.0]]).astype(np.float32)


def flow_euler_sigmas(steps: int, flow_shift: float) -> np.ndarray:
    """[steps+1] float32 sigmas of diffusers' FlowMatchEulerDiscreteScheduler(shift=flow_shift), last = 0.

    Reproduces its arithmetic: the constructor shifts the 1000 training sigmas in fp32, then `set_timesteps` spaces
    N points from sigma_max to that (already shifted) sigma_min and shifts again in fp64, so sigma_min is shifted
    twice (the last nonzero sigma of 28 steps at shift 3 is 0.00893, not 0.003). SANA's `FlowEuler` is this class.
    """
    shift = np.float32(flow_shift)
    train_min = np.float32(1.0) / np.float32(NUM_TRAIN_TIMESTEPS)  # the constructor's last training sigma
    sigma_min = float(shift * train_min / (np.float32(1.0) + (shift - np.float32(1.0)) * train_min))
    timesteps = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)  # sigma_max = 1
    sigmas = timesteps / NUM_TRAIN_TIMESTEPS
    sigmas = flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas)
    return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])


def scm_timesteps(steps: int, max_timestep: float = SCM_MAX_TIMESTEP,
                  intermediate_timestep: float | None = None) -> np.ndarray:
    """[steps+1] float32 TrigFlow times of SANA-Sprint: [max, intermediate, 0] for 2 steps, else linspace(max, 0).

    intermediate_timestep: None uses 1.3 for 2 steps (the Sprint pipelines' default) and linspace otherwise; an
    explicit value needs steps == 2 (diffusers raises too; the original only warns and falls back to linspace).
    """
    if intermediate_timestep is not None and steps != 2:
        raise ValueError(f"intermediate_timestep={intermediate_timestep} needs steps=2 (the 2-step Sprint schedule), "
                         f"got steps={steps}")
    if steps == 2:
        middle = SCM_INTERMEDIATE_TIMESTEP if intermediate_timestep is None else intermediate_timestep
        return np.array([max_timestep, middle, 0.0], np.float32)
    return np.linspace(max_timestep, 0.0, steps + 1).astype(np.float32)


def dpm_solver_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """[N, 3] float32 (a, b, c) of DPM-Solver++ 2M on flow sigmas: x_next = a x + b m0 + c (m0 - m_prev).

    alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_next - lambda_cur, m = x - sigma v the data
    prediction. First step first order (c = 0); then second order (midpoint): a = sigma_next / sigma,
    b = -alpha_next expm1(-h), c = b / (2 r0) with r0 = h_prev / h. The last step (sigma_next = 0, lambda = +inf) is
    first order and returns the data prediction (a = 0, b = 1): SANA's and diffusers' `lower_order_final`, applied
    for any step count. Computed in fp64 from the fp32 grid.
    """
    sig = sigmas.astype(np.float64)
    n = len(sig) - 1
    out = np.zeros((n, 3), np.float64)
    with np.errstate(divide="ignore"):
        lam = np.log(1.0 - sig) - np.log(sig)  # +inf at sigma = 0
    for i in range(n):
        if sig[i + 1] == 0.0:
            out[i] = (0.0, 1.0, 0.0)
            continue
        h = lam[i + 1] - lam[i]
        b = -(1.0 - sig[i + 1]) * math.expm1(-h)
        c = 0.0 if i == 0 else 0.5 * b * h / (lam[i] - lam[i - 1])
        out[i] = (sig[i + 1] / sig[i], b, c)
    return out.astype(np.float32)


def make_schedule(method: str, steps: int, flow_shift: float = 3.0, timestep_convention: str = "sana",
                  max_timestep: float = SCM_MAX_TIMESTEP, intermediate_timestep: float | None = None) -> Schedule:
    """The host-side schedule `sample` runs: grid, the timesteps `velocity_fn` sees, per-step coefficients.

    Coefficients per step: flow_dpm_solver (a, b, c) of `dpm_solver_coefficients`; flow_euler (dt,) =
    sigma_next - sigma in fp32; scm (t, cos s, sin s, cos s_next, sin s_next) with t = sin s / (cos s + sin s) the
    flow time (SanaMSCM), all fp32.
    """
    _check_choice("method", method, METHODS)
    _check_choice("timestep_convention", timestep_convention, TIMESTEP_CONVENTIONS)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    if method != "scm" and not (isinstance(flow_shift, (int, float)) and flow_shift > 0):
        raise ValueError(f"flow_shift must be a number > 0, got {flow_shift!r}")
    thousand = np.float32(NUM_TRAIN_TIMESTEPS)
    if method == "scm":
        grid = scm_timesteps(steps, max_timestep, intermediate_timestep)
        s, s_next = grid[:-1], grid[1:]
        t = np.sin(s) / (np.cos(s) + np.sin(s))  # fp32, as SanaMSCM.forward
        coefficients = np.stack([t, np.cos(s), np.sin(s), np.cos(s_next), np.sin(s_next)], axis=1)
        # Sprint's model divides 1000 t back by timestep_norm_scale_factor = 1000: never truncated.
        return Schedule(grid, (t * thousand).astype(np.float32), coefficients.astype(np.float32))
    if method == "flow_dpm_solver":
        grid = flow_dpm_sigmas(steps, flow_shift)
        coefficients = dpm_solver_coefficients(grid)
    else:
        grid = flow_euler_sigmas(steps, flow_shift)
        coefficients = (grid[1:] - grid[:-1])[:, None]  # dt in fp32, as FlowMatchEulerDiscreteScheduler.step
    timesteps = grid[:-1] * thousand  # fp32 product: SANA's t * 1000, FlowMatchEuler's sigmas * 1000
    if method == "flow_dpm_solver" and timestep_convention == "diffusers":
        # (fp64 sigma * 1000).astype(int64), taken before the grid is rounded to fp32.
        timesteps = np.floor(_flow_dpm_sigmas64(steps, flow_shift) * NUM_TRAIN_TIMESTEPS)
    elif timestep_convention == "sana":
        timesteps = np.floor(timesteps)  # SanaMS.forward: timestep.long() (flow_euler "diffusers" stays float)
    return Schedule(grid, timesteps.astype(np.float32), coefficients.astype(np.float32))


def trigflow_from_velocity(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """SANA-Sprint's TrigFlow prediction F from a flow velocity (`SanaMSCM.forward`, as `sprint.trigflow_forward`).

    Args:
      x: latents already divided by sigma_data, shaped like the sampler's noise ([B, ...]).
      t: [B] flow time t = sin s / (sin s + cos s) of the TrigFlow time s.
    With r = sqrt(t^2 + (1 - t)^2): v = velocity_fn(x r, 1000 t); F = ((1 - 2t) x r + (1 - 2t + 2t^2) v) / r.
    """
    tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
    r = jnp.sqrt(tb ** 2 + (1 - tb) ** 2)
    x_in = x * r
    v = velocity_fn(x_in, t * NUM_TRAIN_TIMESTEPS).astype(jnp.float32)
    return ((1 - 2 * tb) * x_in + (1 - 2 * tb + 2 * tb ** 2) * v) / r


def sample(velocity_fn: VelocityFn, noise: jax.Array, *, method: Method = "flow_dpm_solver", steps: int | None = None,
           flow_shift: float = 3.0, timestep_convention: TimestepConvention = "sana", key: jax.Array | None = None,
           step_noise: jax.Array | None = None, sigma_data: float = SIGMA_DATA,
           max_timestep: float = SCM_MAX_TIMESTEP, intermediate_timestep: float | None = None,
           return_intermediates: bool = False):
    """Sample from pure noise to latents with one of SANA's samplers, as one `lax.scan`.

    Args:
      velocity_fn: `(x, timestep) -> v`: x shaped like `noise`, timestep [B] float32 on the 0..1000 scale (see the
        module docstring for what each `timestep_convention` passes); returns the flow velocity shaped like x.
        Sprint models embed t = timestep / 1000 (SANA-Sprint's timestep_norm_scale_factor).
      noise: [B, ...] standard normal start (e.g. [B, H/32, W/32, 32] channels-last latents). Computed in fp32.
      method: "flow_dpm_solver" (DPM-Solver++ 2M on flow sigmas, lower-order final; SANA's default),
        "flow_euler" (Euler on FlowMatchEuler's sigmas), or "scm" (SANA-Sprint's TrigFlow consistency sampler:
        x = noise * sigma_data; per step F from `trigflow_from_velocity`, x0 = cos s x - sin s sigma_data F,
        x = cos s_next x0 + sin s_next sigma_data z; returns x0 / sigma_data).
      steps: sampler steps (model calls) >= 1. Default: 20 flow_dpm_solver, 28 flow_euler, 2 scm.
      flow_shift: sigma shift s sigma / (1 + (s - 1) sigma) of the flow methods (configs: `cfg.flow_shift`;
        SANA's FlowEuler always used 3.0). Ignored by scm.
      timestep_convention: "sana" (default), "diffusers" or "continuous"; see the module docstring.
      key: PRNG key of scm's per-step noise z (one split per step); needed for scm with steps >= 2.
      step_noise: [steps, *noise.shape] explicit standard-normal z per scm step instead of `key` (the last step's
        z is multiplied by sin 0 = 0, as in SANA and diffusers, which still draw it).
      sigma_data: scm's data scale (0.5 for SANA-Sprint).
      max_timestep, intermediate_timestep: scm's TrigFlow grid, see `scm_timesteps`.
      return_intermediates: also return a `Trajectory` of every step.
    Returns:
      final latents, fp32, shaped like `noise` (and the `Trajectory` if requested).
    Raises:
      ValueError: unknown method or convention, steps < 1, scm noise missing or mis-shaped.
    """
    _check_choice("method", method, METHODS)
    steps = DEFAULT_STEPS[method] if steps is None else steps
    schedule = make_schedule(method, steps, flow_shift, timestep_convention, max_timestep, intermediate_timestep)
    noise = jnp.asarray(noise, jnp.float32)
    if method == "scm":
        step_noise = _scm_step_noise(noise, schedule.steps, key, step_noise)
    return run_schedule(velocity_fn, noise, method, schedule.timesteps, schedule.grid, schedule.coefficients,
                        step_noise=step_noise, sigma_data=sigma_data, return_intermediates=return_intermediates)


def run_schedule(velocity_fn: VelocityFn, noise: jax.Array, method: Method, timesteps, grid, coefficients, *,
                 step_noise: jax.Array | None = None, sigma_data: float = SIGMA_DATA,
                 return_intermediates: bool = False):
    """The sampling loop of `sample` on a given schedule, as one `lax.scan`: final (, Trajectory).

    timesteps [N], grid [N+1], coefficients [N, K] are a `Schedule`'s fields and may be traced arrays: a jitted
    caller that passes them as arguments compiles once per (method, N, shapes), whatever the flow shift or
    timestep convention. step_noise: [N, *noise.shape] standard normal (scm only). Without
    `return_intermediates` the scan keeps only its carry (no [N, *noise.shape] stacks).
    """
    _check_choice("method", method, METHODS)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.ndim < 1:
        raise ValueError(f"noise must be [B, ...], got shape {noise.shape}")
    batch = noise.shape[0]
    timesteps, grid = jnp.asarray(timesteps, jnp.float32), jnp.asarray(grid, jnp.float32)
    coefficients = jnp.asarray(coefficients, jnp.float32)
    sigmas = grid[:-1]
    keep = (lambda x, x0: (x, x0)) if return_intermediates else (lambda x, x0: None)  # noqa: E731

    def velocity(x, t):  # t: [B] float32; fp32 result with a checked shape
        v = velocity_fn(x, t)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {v.shape}, expected {x.shape} (shaped like noise)")
        return v.astype(jnp.float32)

    if method == "flow_dpm_solver":
        def step(carry, xs):
            x, m_prev = carry
            t, sigma, (a, b, c) = xs
            m0 = x - sigma * velocity(x, jnp.full((batch,), t))  # data prediction of a flow model (diffusers')
            x = a * x + b * m0 + c * (m0 - m_prev)
            return (x, m0), keep(x, m0)

        (final, _), ys = jax.lax.scan(step, (noise, jnp.zeros_like(noise)), (timesteps, sigmas, coefficients))
        start = noise
    elif method == "flow_euler":
        def step(x, xs):
            t, sigma, (dt,) = xs
            v = velocity(x, jnp.full((batch,), t))
            return x + dt * v, keep(x + dt * v, x - sigma * v)

        final, ys = jax.lax.scan(step, noise, (timesteps, sigmas, coefficients))
        start = noise
    else:
        if step_noise is None or tuple(step_noise.shape) != (timesteps.shape[0], *noise.shape):
            got = None if step_noise is None else tuple(step_noise.shape)
            raise ValueError(f"scm needs step_noise [steps, *noise.shape] = {(timesteps.shape[0], *noise.shape)}, "
                             f"got {got}")

        def step(carry, xs):
            x, _ = carry
            (t, cos_s, sin_s, cos_next, sin_next), z = xs
            f = trigflow_from_velocity(velocity, x / sigma_data, jnp.full((batch,), t))
            x0 = cos_s * x - sin_s * (sigma_data * f)
            x = cos_next * x0 + sin_next * (sigma_data * z)
            return (x, x0), keep(x, x0)

        start = noise * sigma_data
        (_, last_x0), ys = jax.lax.scan(step, (start, jnp.zeros_like(start)),
                                        (coefficients, jnp.asarray(step_noise, jnp.float32)))
        final = last_x0 / sigma_data
    if not return_intermediates:
        return final
    xs_out, x0s = ys
    return final, Trajectory(timesteps=timesteps, grid=grid, x=jnp.concatenate([start[None], xs_out]), x0=x0s)


def _scm_step_noise(noise: jax.Array, steps: int, key: jax.Array | None, step_noise: jax.Array | None):
    """[steps, *noise.shape] standard-normal z of each scm step (drawn from `key` with one split per step)."""
    if step_noise is not None:
        if key is not None:
            raise ValueError("pass either key or step_noise for scm, not both")
        step_noise = jnp.asarray(step_noise, jnp.float32)
        if step_noise.shape != (steps, *noise.shape):
            raise ValueError(f"step_noise must be [steps, *noise.shape] = {(steps, *noise.shape)}, "
                             f"got {step_noise.shape}")
        return step_noise
    if key is None:
        if steps > 1:
            raise ValueError(f"scm with steps={steps} adds fresh noise between steps: pass key (a PRNG key) or "
                             "step_noise")
        return jnp.zeros((steps, *noise.shape), jnp.float32)  # one step: z is multiplied by sin 0 = 0
    keys = jax.random.split(key, steps)
    return jax.vmap(lambda k: jax.random.normal(k, noise.shape, jnp.float32))(keys)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
