"""SANA sampling on the PyTorch reference path (CPU or CUDA): diffusers' schedulers driving `SanaRef`.

The same methods, defaults and timestep conventions as `sana_jax.sampling` (see its module docstring), so one
noise tensor gives the same latents on both stacks:

    model = load_official("Sana_1600M_1024px.pth", cfg, linear_attn="triton").cuda()   # or the naive op (default)
    velocity = cfg_velocity(model, y, mask, y_null, guidance_scale=4.5)  # or sprint_velocity(...)
    latents = sample(velocity, noise, method="flow_dpm_solver", steps=20, flow_shift=cfg.flow_shift)
    images = vae.decode(latents / vae.config.scaling_factor).sample      # diffusers AutoencoderDC

Layout is channels-first as the rest of `sana_torch_ref`: latents [B, C, H, W]. diffusers is imported lazily.
"""

from __future__ import annotations

from typing import Callable

import torch

from sana_torch_ref.model import SanaRef

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("flow_dpm_solver", "flow_euler", "scm")
TIMESTEP_CONVENTIONS = ("sana", "diffusers", "continuous")
DEFAULT_STEPS = {"flow_dpm_solver": 20, "flow_euler": 28, "scm": 2}
SCM_MAX_TIMESTEP = 1.57080
SCM_INTERMEDIATE_TIMESTEP = 1.3
SIGMA_DATA = 0.5


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, *, method: str = "flow_dpm_solver", steps: int | None = None,
           flow_shift: float = 3.0, timestep_convention: str = "sana", generator: torch.Generator | None = None,
           step_noise: torch.Tensor | None = None, sigma_data: float = SIGMA_DATA,
           max_timestep: float = SCM_MAX_TIMESTEP, intermediate_timestep: float | None = None) -> torch.Tensor:
    """Final latents (fp32, shaped like `noise`) from standard-normal `noise` [B, ...].

    velocity_fn(x, timestep [B] fp32 on 0..1000) -> flow velocity. method / steps / flow_shift /
    timestep_convention / sigma_data / max_timestep / intermediate_timestep: as `sana_jax.sampling.sample`.
    scm's per-step noise: `step_noise` [steps, *noise.shape], else drawn by diffusers' SCMScheduler from
    `generator` (required for steps >= 2).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if timestep_convention not in TIMESTEP_CONVENTIONS:
        raise ValueError(f"unknown timestep_convention {timestep_convention!r}; choose one of "
                         f"{', '.join(TIMESTEP_CONVENTIONS)}")
    steps = DEFAULT_STEPS[method] if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    x = noise.float()
    if method == "scm":
        return _sample_scm(velocity_fn, x, steps, generator, step_noise, sigma_data, max_timestep,
                           intermediate_timestep)
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if method == "flow_dpm_solver":
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                flow_shift=flow_shift)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    scheduler.set_timesteps(steps, device=x.device)
    for i, t in enumerate(scheduler.timesteps):
        # diffusers hands the scheduler's own timestep (int64 for DPM, float for Euler) to the model.
        t_model = scheduler.sigmas[i].float().to(x.device) * 1000  # SANA's float t * 1000
        if timestep_convention == "sana":
            t_model = torch.floor(t_model)  # what SanaMS.forward's timestep.long() embeds
        elif timestep_convention == "diffusers":
            t_model = t.float()
        v = velocity_fn(x, t_model.expand(x.shape[0])).float()
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def _sample_scm(velocity_fn, x, steps, generator, step_noise, sigma_data, max_timestep, intermediate_timestep):
    """SanaSprintPipeline's loop: TrigFlow wrapper around the flow velocity, SCMScheduler steps."""
    from diffusers import SCMScheduler

    if intermediate_timestep is not None and steps != 2:
        raise ValueError(f"intermediate_timestep={intermediate_timestep} needs steps=2, got steps={steps}")
    if step_noise is None and generator is None and steps > 1:
        raise ValueError(f"scm with steps={steps} adds fresh noise between steps: pass generator or step_noise")
    scheduler = SCMScheduler(sigma_data=sigma_data)
    if steps == 2:
        middle = SCM_INTERMEDIATE_TIMESTEP if intermediate_timestep is None else intermediate_timestep
    else:
        middle = None
    scheduler.set_timesteps(steps, max_timesteps=max_timestep, intermediate_timesteps=middle, device=x.device)
    scheduler.set_begin_index(0)
    latents, denoised = x * sigma_data, None
    for i, s in enumerate(scheduler.timesteps[:-1]):
        s = s.expand(x.shape[0])
        t = torch.sin(s) / (torch.cos(s) + torch.sin(s))  # flow time (SanaMSCM)
        tb = t.view(-1, *([1] * (x.ndim - 1)))
        r = torch.sqrt(tb ** 2 + (1 - tb) ** 2)
        x_in = latents / sigma_data * r
        v = velocity_fn(x_in, t * 1000).float()
        f = ((1 - 2 * tb) * x_in + (1 - 2 * tb + 2 * tb ** 2) * v) / r
        if step_noise is None:
            latents, denoised = scheduler.step(f * sigma_data, s, latents, generator=generator, return_dict=False)
        else:  # the scheduler's update with explicit draws: x0 = cos s x - sin s F; x = cos s' x0 + sin s' sigma z
            s0, s1 = scheduler.timesteps[i], scheduler.timesteps[i + 1]
            denoised = torch.cos(s0) * latents - torch.sin(s0) * (f * sigma_data)
            latents = torch.cos(s1) * denoised + torch.sin(s1) * (step_noise[i].float() * sigma_data)
    return denoised / sigma_data


def cfg_velocity(model: SanaRef, y: torch.Tensor, mask: torch.Tensor | None, y_null: torch.Tensor | None = None,
                 mask_null: torch.Tensor | None = None, guidance_scale: float = 4.5) -> VelocityFn:
    """Velocity with classifier-free guidance, batch [uncond; cond] as SANA and diffusers build it.

    y [B, L, C] / mask [B, L] the captions; y_null [1 or B, L, C] the null caption; mask_null None uses the cond
    mask for the uncond half (SANA), else its own (diffusers). guidance_scale <= 1 or y_null None: no CFG.
    The model's dtype is used for its inputs; guidance is combined in fp32.
    """
    dtype, scale = model.dtype, model.config.timestep_scale
    if y_null is None or guidance_scale <= 1:
        return lambda x, t: model(x.to(dtype), t * scale, y.to(dtype), mask).float()
    y2 = torch.cat([y_null.expand_as(y), y]).to(dtype)
    m = torch.ones(y.shape[:2], device=y.device) if mask is None else mask
    m2 = torch.cat([m if mask_null is None else mask_null.expand_as(m), m])

    def velocity(x, t):
        v = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]) * scale, y2, m2).float()
        uncond, cond = v.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return velocity


def sprint_velocity(model: SanaRef, y: torch.Tensor, mask: torch.Tensor | None,
                    guidance_scale: float = 4.5) -> VelocityFn:
    """SANA-Sprint's flow velocity: continuous t = timestep / 1000 and the guidance scale embedded, no CFG pass."""
    dtype = model.dtype

    def velocity(x, t):
        g = torch.full((x.shape[0],), guidance_scale, device=x.device, dtype=torch.float32)
        return model(x.to(dtype), t / 1000, y.to(dtype), mask, guidance=g).float()

    return velocity
