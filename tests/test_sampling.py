"""sana_jax.sampling against SANA's own samplers (golden trajectories) and diffusers' schedulers, step by step.

The velocity field is the fixtures' deterministic stand-in for a model (fixtures/README-came-samplers.md §B):
v(x, t) = tanh(x) 0.7 + 0.2 x - 0.1 + 0.001 t, elementwise, t broadcast per batch row.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sana_jax import sampling
from tests.helpers import assert_close

# run -> (method, steps, flow_shift) of samplers_original.safetensors.
FIXTURE_RUNS = {
    "dpm20_s3": ("flow_dpm_solver", 20, 3.0),
    "dpm14_s4": ("flow_dpm_solver", 14, 4.0),
    "euler28_s3": ("flow_euler", 28, 3.0),
    "scm2": ("scm", 2, None),
    "scm4": ("scm", 4, None),
}


def velocity_jax(x, t):
    return jnp.tanh(x) * 0.7 + 0.2 * x - 0.1 + 0.001 * t.reshape((-1,) + (1,) * (x.ndim - 1))


def velocity_torch(x, t):
    return torch.tanh(x) * 0.7 + 0.2 * x - 0.1 + 0.001 * t.float().reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.fixture(scope="module")
def samplers_fixture(fixtures_dir):
    return load_file(os.path.join(fixtures_dir, "samplers_original.safetensors"))


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(42).standard_normal((3, 6, 10, 4)).astype(np.float32)  # B=3, channels-last


# --- SANA's own samplers (NVlabs/Sana 47777fb), from the golden trajectories ---------------------------------------

@pytest.mark.parametrize("run", list(FIXTURE_RUNS))
def test_original_trajectory(samplers_fixture, run):
    """timestep_convention="continuous" passes what SANA's samplers pass; every timestep and latent matches."""
    f = samplers_fixture
    method, steps, shift = FIXTURE_RUNS[run]
    kwargs = {"flow_shift": shift} if shift else {}
    if method == "scm":
        kwargs["step_noise"] = np.stack([f[f"{run}.step_noise.{i}"] for i in range(steps)])
    final, traj = sampling.sample(velocity_jax, f["noise"], method=method, steps=steps,
                                  timestep_convention="continuous", return_intermediates=True, **kwargs)
    timesteps = f[f"{run}.flow_timesteps"] if method == "scm" else f[f"{run}.timesteps"]
    assert_close(f"{run}.timesteps", timesteps, traj.timesteps, "sampler_fp32")
    grid = {"flow_dpm_solver": "t_grid", "flow_euler": "sigmas", "scm": "t_grid"}[method]
    assert_close(f"{run}.{grid}", f[f"{run}.{grid}"], traj.grid, "sampler_fp32")
    for i in range(steps + 1):
        assert_close(f"{run}.x.{i}", f[f"{run}.x.{i}"], traj.x[i], "fixture_sampler")
    if method == "flow_dpm_solver":
        # SANA's first x0 = (x - t eps) / (1 - t) cancels catastrophically at t = 0.9997 (fixtures README quirk 2).
        assert_close(f"{run}.x0_pred.0", f[f"{run}.x0_pred.0"], traj.x0[0], "fixture_dpm_first_x0")
        for i in range(1, steps):
            assert_close(f"{run}.x0_pred.{i}", f[f"{run}.x0_pred.{i}"], traj.x0[i], "fixture_sampler")
    if method == "scm":
        for i in range(steps):
            assert_close(f"{run}.denoised.{i}", f[f"{run}.denoised.{i}"], traj.x0[i], "fixture_sampler")
    assert_close(f"{run}.final", f[f"{run}.final"], final, "fixture_sampler")


@pytest.mark.parametrize("run", ["dpm20_s3", "dpm14_s4", "euler28_s3"])
def test_sana_convention_floors_what_sana_passes(samplers_fixture, run):
    """"sana": the model gets floor(t) of the float SANA's sampler passes, as SanaMS.forward's timestep.long()."""
    method, steps, shift = FIXTURE_RUNS[run]
    schedule = sampling.make_schedule(method, steps, shift, "sana")
    np.testing.assert_array_equal(schedule.timesteps, np.floor(samplers_fixture[f"{run}.timesteps"]))


def test_scm_timesteps_ignore_the_convention():
    """Sprint divides 1000 t by its timestep_norm_scale_factor: never truncated, whatever the convention."""
    a, b = (sampling.make_schedule("scm", 4, timestep_convention=c).timesteps for c in ("sana", "diffusers"))
    np.testing.assert_array_equal(a, b)
    assert (a != np.floor(a)).any()


# --- diffusers 0.42.1 schedulers, step by step ---------------------------------------------------------------------

def _run_diffusers(scheduler, timesteps, noise, on_step):
    x = torch.from_numpy(noise)
    xs, x0s, model_ts = [x], [], []
    for t in timesteps:
        t_model = t.expand(x.shape[0])
        model_ts.append(float(t_model[0]))
        x, x0 = on_step(scheduler, t, t_model, x)
        xs.append(x)
        x0s.append(x0)
    return np.array(model_ts, np.float32), xs, x0s


def _compare(name, traj, final, model_ts, xs, x0s):
    assert_close(f"{name} timesteps", model_ts, traj.timesteps, "sampler_fp32")
    for i, x in enumerate(xs):
        assert_close(f"{name} x.{i}", x, traj.x[i], "sampler_fp32")
    for i, x0 in enumerate(x0s):
        if x0 is not None:
            assert_close(f"{name} x0.{i}", x0, traj.x0[i], "sampler_fp32")
    assert_close(f"{name} final", xs[-1] if x0s[-1] is None else x0s[-1], final, "sampler_fp32")


@pytest.mark.parametrize("steps,shift", [(20, 3.0), (14, 4.0), (7, 6.0), (2, 3.0), (1, 3.0)])
def test_flow_dpm_solver_matches_diffusers(noise, steps, shift):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            flow_shift=shift)
    scheduler.set_timesteps(steps)

    def on_step(sch, t, t_model, x):
        x = sch.step(velocity_torch(x, t_model), t, x).prev_sample
        return x, sch.model_outputs[-1].clone()

    model_ts, xs, x0s = _run_diffusers(scheduler, scheduler.timesteps, noise, on_step)
    final, traj = sampling.sample(velocity_jax, noise, method="flow_dpm_solver", steps=steps, flow_shift=shift,
                                  timestep_convention="diffusers", return_intermediates=True)
    np.testing.assert_array_equal(traj.timesteps, scheduler.timesteps.numpy())  # the int64 timesteps, exactly
    assert_close("dpm sigmas", scheduler.sigmas, traj.grid, "sampler_fp32")
    _compare(f"dpm{steps}_s{shift}", traj, final, model_ts, xs, [None] * (steps - 1) + [x0s[-1]])
    for i, x0 in enumerate(x0s):
        assert_close(f"dpm{steps} x0.{i}", x0, traj.x0[i], "sampler_fp32")


@pytest.mark.parametrize("steps,shift", [(28, 3.0), (20, 7.0), (1, 3.0)])
def test_flow_euler_matches_diffusers(noise, steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)

    def on_step(sch, t, t_model, x):
        return sch.step(velocity_torch(x, t_model), t, x).prev_sample, None

    model_ts, xs, x0s = _run_diffusers(scheduler, scheduler.timesteps, noise, on_step)
    final, traj = sampling.sample(velocity_jax, noise, method="flow_euler", steps=steps, flow_shift=shift,
                                  timestep_convention="diffusers", return_intermediates=True)
    np.testing.assert_array_equal(traj.grid, scheduler.sigmas.numpy())  # FlowMatchEuler's arithmetic, bitwise
    _compare(f"euler{steps}_s{shift}", traj, final, model_ts, xs, x0s)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_matches_diffusers_with_trigflow_wrapper(noise, steps):
    """SCMScheduler + SanaSprintPipeline's TrigFlow loop (diffusers 0.42.1), latents x noise * sigma_data."""
    from diffusers import SCMScheduler

    sigma_data = 0.5
    scheduler = SCMScheduler()
    scheduler.set_timesteps(steps, max_timesteps=1.57080, intermediate_timesteps=1.3 if steps == 2 else None)
    scheduler.set_begin_index(0)
    generator = torch.Generator().manual_seed(5678)

    def on_step(sch, t, t_model, x):  # SanaSprintPipeline.__call__'s loop body
        x_in = x / sigma_data
        s = torch.sin(t_model) / (torch.cos(t_model) + torch.sin(t_model))
        sb = s.view(-1, 1, 1, 1)
        x_in = x_in * torch.sqrt(sb ** 2 + (1 - sb) ** 2)
        v = velocity_torch(x_in, s * 1000)
        f = ((1 - 2 * sb) * x_in + (1 - 2 * sb + 2 * sb ** 2) * v) / torch.sqrt(sb ** 2 + (1 - sb) ** 2)
        return sch.step(f * sigma_data, t_model, x, generator=generator, return_dict=False)

    x = torch.from_numpy(noise) * sigma_data
    s_values, xs, x0s = _run_diffusers(scheduler, scheduler.timesteps[:-1], x.numpy(), on_step)
    replay = torch.Generator().manual_seed(5678)  # the scheduler's draws, one per step
    step_noise = np.stack([torch.randn(noise.shape, generator=replay).numpy() for _ in range(steps)])
    final, traj = sampling.sample(velocity_jax, noise, method="scm", steps=steps, step_noise=step_noise,
                                  return_intermediates=True)
    assert_close("scm grid", scheduler.timesteps, traj.grid, "sampler_fp32")
    assert_close("scm s", s_values, traj.grid[:-1], "sampler_fp32")
    for i, (xi, x0) in enumerate(zip(xs, x0s + [None])):
        assert_close(f"scm{steps} x.{i}", xi, traj.x[i], "sampler_fp32")
        if x0 is not None:
            assert_close(f"scm{steps} denoised.{i}", x0, traj.x0[i], "sampler_fp32")
    assert_close(f"scm{steps} final", x0s[-1] / sigma_data, final, "sampler_fp32")


def test_trigflow_wrapper_matches_sprint_model_wrapper():
    """The sampler's TrigFlow wrapper on a Sprint model's velocity equals `sana_jax.sprint.trigflow_forward`."""
    import sana_jax
    from sana_jax import configs, sprint

    cfg = configs.TINY.replace(qk_norm=True, cross_norm=True, guidance_embeds=True)
    model = sana_jax.SanaTransformer(cfg)
    # Random (perturbed zero) parameters: jitting the real init costs ~15 s of XLA compile on 2 cores.
    params = sana_jax.perturb_params(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                                            sana_jax.abstract_params(model)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 6, cfg.in_channels)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 5, cfg.caption_channels)), jnp.float32)
    s, g = jnp.array([1.3, 0.4]), jnp.array([4.5, 3.0])
    ref = jax.jit(lambda p: sprint.trigflow_forward(model, p, x, s, y, None, g))(params)
    t = jnp.sin(s) / (jnp.cos(s) + jnp.sin(s))
    out = jax.jit(lambda p: sampling.trigflow_from_velocity(
        lambda xi, ti: model.apply({"params": p}, xi, ti / 1000, y, None, guidance=g), x, t))(params)
    assert_close("trigflow wrapper", ref, out, "tiny_fp32")


# --- one compiled loop, jit, keys, errors --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["flow_dpm_solver", "flow_euler", "scm"])
def test_one_scan_traces_velocity_once_and_jits(noise, method):
    calls = []

    def counting(x, t):
        calls.append(t.shape)
        return velocity_jax(x, t)

    kwargs = {"key": jax.random.key(1)} if method == "scm" else {}
    eager = sampling.sample(counting, noise, method=method, **kwargs)
    assert calls == [(3,)], "velocity_fn must be traced once inside one lax.scan"
    jaxpr = jax.make_jaxpr(lambda n: sampling.sample(velocity_jax, n, method=method, **kwargs))(noise)
    assert sum(e.primitive.name == "scan" for e in jaxpr.eqns) == 1
    jitted = jax.jit(lambda n: sampling.sample(velocity_jax, n, method=method, **kwargs))(noise)
    assert_close(f"{method} jit vs eager", eager, jitted, "sampler_fp32")


def test_scm_key_is_reproducible(noise):
    run = jax.jit(lambda key: sampling.sample(velocity_jax, noise, method="scm", steps=4, key=key))
    a, b, c = run(jax.random.key(3)), run(jax.random.key(3)), run(jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_default_steps():
    assert sampling.DEFAULT_STEPS == {"flow_dpm_solver": 20, "flow_euler": 28, "scm": 2}
    assert len(sampling.make_schedule("flow_dpm_solver", 20).timesteps) == 20
    # the 20-step shift-3 int timesteps of reference/diffusers.md §4
    assert sampling.make_schedule("flow_dpm_solver", 20, 3.0, "diffusers").timesteps[[0, 1, -1]].tolist() == \
        [999, 982, 136]


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "ddim"}, "unknown method 'ddim'"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer >= 1"),
    ({"timestep_convention": "int"}, "unknown timestep_convention 'int'"),
    ({"flow_shift": 0.0}, "flow_shift must be a number > 0"),
    ({"method": "scm", "steps": 2}, "pass key"),
    ({"method": "scm", "steps": 4, "intermediate_timestep": 1.3, "key": jax.random.key(0)}, "needs steps=2"),
    ({"method": "scm", "steps": 2, "step_noise": np.zeros((3, 3, 6, 10, 4))}, r"step_noise must be \[steps"),
])
def test_errors(noise, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(velocity_jax, noise, **kwargs)


def test_velocity_shape_error(noise):
    with pytest.raises(ValueError, match="velocity_fn returned shape"):
        sampling.sample(lambda x, t: x[..., :2], noise, steps=2)
