"""DDIM sampling loop of the released DynamiCrafter checkpoints.

Written from the description in the original release and the ``dynamicrafter_ddim`` fixture
notes. The sampler knows nothing about the UNet: it calls ``model_fn(x, t, cond) -> output`` where
``t`` is an int64 tensor ``[B]`` and ``cond`` is whatever the caller passes (see
:func:`hybrid_model_fn` for DynamiCrafter's "hybrid" conditioning).

**Timesteps** (``S`` DDIM steps over ``T`` training steps):

* ``"uniform"`` (256 model): ``c = T // S``; ``t = [0, c, 2c, ...] + 1`` (``range(0, T, c)``), e.g.
  1, 21, ..., 981 for S = 50.
* ``"uniform_trailing"`` (512/1024): ``c = T / S``; ``t = flip(round(arange(T, 0, -c))) - 1``, e.g.
  19, 39, ..., 999 for S = 50 (round half to even, as numpy).

**Per-step tables** (``ac`` = the float32 ``alphas_cumprod``; step ``k`` of the ascending list):
``a_k = ac[t_k]`` (float32), ``a_prev_k = ac[t_{k-1}]`` with ``a_prev_0 = ac[0]`` (not 1), and
``sigma_k = eta * sqrt((1 - a_prev_k) / (1 - a_k) * (1 - a_k / a_prev_k))``; ``a_prev`` and ``sigma``
are computed in float64 from the float32 ``ac`` and rounded to float32 when used, like the original.
``sqrt_one_minus_a_k = sqrt(1 - a_k)`` (float32). With dynamic rescale, ``scale_k = scale_arr[t_k]``
and ``scale_prev_k = scale_{k-1}`` with ``scale_prev_0 = scale_0``.

**One step** at DDIM index ``k`` (the loop runs ``k = S-1, ..., 0``, i.e. from the largest t):

1. ``cond_out = model_fn(x, t, cond)``; with guidance (an ``uncond`` and ``scale != 1``),
   ``uncond_out = model_fn(x, t, uncond)`` (a second, separate call) and
   ``out = uncond_out + scale * (cond_out - uncond_out)``.
2. Guidance rescale (Lin et al. 2023, Sec. 3.4), if ``guidance_rescale > 0``:
   ``out <- phi * out * std(cond_out) / std(out) + (1 - phi) * out`` with the unbiased std over all
   non-batch dimensions, per sample.
3. v-models: ``e_t = sqrt(abar_t) * out + sqrt(1 - abar_t) * x`` and
   ``x0 = sqrt(abar_t) * x - sqrt(1 - abar_t) * out`` with the schedule's float32
   ``sqrt_alphas_cumprod`` / ``sqrt_one_minus_alphas_cumprod`` at ``t``.
   eps-models: ``e_t = out`` and ``x0 = (x - sqrt_one_minus_a_k * e_t) / sqrt(a_k)``.
4. Dynamic rescale: ``x0 <- x0 * scale_prev_k / scale_k``.
5. ``x_prev = sqrt(a_prev_k) * x0 + sqrt(1 - a_prev_k - sigma_k^2) * e_t + sigma_k * noise_k``.

``noise_k`` is one standard-normal draw with the shape of ``x`` per step (drawn even when sigma is 0,
like the original); it can be injected (a tensor ``[S, *x.shape]``, a sequence, or a callable).
Nothing is wrapped in ``torch.no_grad``: gradients flow through the loop if the caller wants them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from anti_i2v.models.sampling import NoiseSource, step_noise

from anti_i2v.models.dynamicrafter.schedule import DynamiCrafterSchedule

__all__ = ["DDIMSampler", "hybrid_model_fn", "make_ddim_timesteps", "rescale_noise_cfg"]

TimestepSpacing = Literal["uniform", "uniform_trailing"]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def make_ddim_timesteps(num_steps: int, spacing: TimestepSpacing, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The ascending int64 DDIM timesteps for ``spacing`` ``"uniform"`` or ``"uniform_trailing"``.

    ``uniform``: ``range(0, T, T // S) + 1``. ``uniform_trailing``: ``flip(round(arange(T, 0, -T/S))) - 1``.
    (Like the original, ``uniform`` can return more than ``S`` steps when ``S`` does not divide ``T``.)
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "uniform":
        c = num_train_timesteps // num_steps
        steps = np.arange(0, num_train_timesteps, c, dtype=np.int64) + 1
        steps = steps[steps < num_train_timesteps]  # the original indexes past the table here and crashes
    elif spacing == "uniform_trailing":
        c = num_train_timesteps / num_steps
        steps = np.flip(np.round(np.arange(num_train_timesteps, 0, -c))).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r} (expected 'uniform' or 'uniform_trailing')")
    return torch.from_numpy(np.ascontiguousarray(steps))


def rescale_noise_cfg(guided: torch.Tensor, cond_out: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. guidance rescale: blend ``guided * std(cond)/std(guided)`` with ``guided`` by ``guidance_rescale``.

    The std is unbiased, over all non-batch dimensions, per sample.
    """
    dims = list(range(1, cond_out.dim()))
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def hybrid_model_fn(unet: Callable[..., torch.Tensor], **unet_kwargs: Any) -> ModelFn:
    """``model_fn`` for DynamiCrafter's "hybrid" conditioning (the original ``DiffusionWrapper``).

    ``cond`` is a mapping with ``"c_concat"`` and ``"c_crossattn"`` (each a tensor or a list of
    tensors). The call is ``unet(cat([x, *c_concat], dim=1), t, context=cat(c_crossattn, dim=1),
    **unet_kwargs)``, e.g. ``unet_kwargs = {"fs": fs}``. At inference both the cond and the uncond
    mapping carry the same ``c_concat`` (the image latent repeated over the frames).
    """

    def _as_list(v: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        if v is None:
            return []
        if isinstance(v, torch.Tensor):
            return [v]
        return list(v)

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        concat = _as_list(cond.get("c_concat"))
        cross = _as_list(cond.get("c_crossattn"))
        xc = torch.cat([x, *concat], dim=1) if concat else x
        context = torch.cat(cross, dim=1) if cross else None
        return unet(xc, t, context=context, **unet_kwargs)

    return model_fn


class DDIMSampler:
    """DDIM sampler of DynamiCrafter (eta, CFG, guidance rescale, dynamic rescale, v/eps).

    Args:
        schedule: the model's :class:`DynamiCrafterSchedule`.
        num_steps: DDIM steps ``S`` (50 in the released settings).
        timestep_spacing: ``"uniform_trailing"`` (512/1024) or ``"uniform"`` (256).
        eta: DDIM eta; 1.0 (stochastic) in the released settings.

    Attributes (tables per DDIM step, ascending in t): ``ddim_timesteps`` (int64),
    ``ddim_alphas`` (float32), ``ddim_alphas_prev`` and ``ddim_sigmas`` (float64),
    ``ddim_sqrt_one_minus_alphas`` (float32) and, with dynamic rescale, ``ddim_scale_arr`` and
    ``ddim_scale_arr_prev`` (float32).
    """

    def __init__(
        self,
        schedule: DynamiCrafterSchedule,
        num_steps: int = 50,
        timestep_spacing: TimestepSpacing = "uniform_trailing",
        eta: float = 1.0,
    ) -> None:
        self.schedule = schedule
        self.make_schedule(num_steps, timestep_spacing, eta)

    def make_schedule(self, num_steps: int, timestep_spacing: TimestepSpacing, eta: float) -> None:
        """(Re)compute the DDIM timesteps and per-step tables (see the module docstring)."""
        sch = self.schedule
        self.num_steps = int(num_steps)
        self.timestep_spacing = timestep_spacing
        self.eta = float(eta)
        ts = make_ddim_timesteps(self.num_steps, timestep_spacing, sch.num_timesteps)
        self.ddim_timesteps = ts
        ac = sch.alphas_cumprod  # float32
        alphas = ac[ts]
        alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]]).to(torch.float64)
        a64 = alphas.to(torch.float64)
        self.ddim_alphas = alphas
        self.ddim_alphas_prev = alphas_prev
        self.ddim_sigmas = self.eta * torch.sqrt((1.0 - alphas_prev) / (1.0 - a64) * (1.0 - a64 / alphas_prev))
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - alphas)
        if sch.use_dynamic_rescale:
            assert sch.scale_arr is not None
            self.ddim_scale_arr: torch.Tensor | None = sch.scale_arr[ts]
            self.ddim_scale_arr_prev: torch.Tensor | None = torch.cat(
                [self.ddim_scale_arr[:1], self.ddim_scale_arr[:-1]]
            )
        else:
            self.ddim_scale_arr = None
            self.ddim_scale_arr_prev = None

    @property
    def total_steps(self) -> int:
        """Number of DDIM steps actually taken (``len(ddim_timesteps)``)."""
        return int(self.ddim_timesteps.numel())

    def step_timesteps(self) -> list[int]:
        """The timesteps in loop order (largest first)."""
        return self.ddim_timesteps.flip(0).tolist()

    # ------------------------------------------------------------------ single step
    def guide(
        self,
        cond_out: torch.Tensor,
        uncond_out: torch.Tensor | None,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
    ) -> torch.Tensor:
        """Classifier-free guidance ``uncond + s * (cond - uncond)`` plus the optional std rescale."""
        if uncond_out is None:
            return cond_out
        out = uncond_out + guidance_scale * (cond_out - uncond_out)
        if guidance_rescale > 0.0:
            out = rescale_noise_cfg(out, cond_out, guidance_rescale)
        return out

    def step(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        index: int,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One DDIM update from ``x`` at DDIM index ``index`` given the (guided) model output.

        Returns ``(x_prev, pred_x0, e_t)``; ``pred_x0`` is after the dynamic rescale. ``noise`` may be
        ``None`` only when ``sigma`` is 0.
        """
        sch = self.schedule
        b = x.shape[0]
        t = torch.full((b,), int(self.ddim_timesteps[index]), dtype=torch.long, device=x.device)

        def scalar(v: torch.Tensor | float) -> torch.Tensor:
            # the original broadcasts each per-step value with torch.full(..., value) -> x's float dtype
            return torch.tensor(float(v), dtype=x.dtype, device=x.device)

        a_t = scalar(self.ddim_alphas[index])
        a_prev = scalar(self.ddim_alphas_prev[index])
        sigma_t = scalar(self.ddim_sigmas[index])
        if sch.parameterization == "v":
            e_t = sch.predict_eps_from_v(x, t, model_output)
            pred_x0 = sch.predict_x0_from_v(x, t, model_output)
        else:
            e_t = model_output
            pred_x0 = (x - scalar(self.ddim_sqrt_one_minus_alphas[index]) * e_t) / a_t.sqrt()
        if self.ddim_scale_arr is not None and self.ddim_scale_arr_prev is not None:
            rescale = scalar(self.ddim_scale_arr_prev[index]) / scalar(self.ddim_scale_arr[index])
            pred_x0 = pred_x0 * rescale
        # 1 - a_prev - sigma^2 can round a hair below 0 when sigma^2 == 1 - a_prev; clamp instead of NaN
        dir_xt = (1.0 - a_prev - sigma_t**2).clamp_min(0.0).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if float(self.ddim_sigmas[index]) != 0.0:
            if noise is None:
                raise ValueError("a noise tensor is needed when sigma > 0 (eta > 0)")
            x_prev = x_prev + sigma_t * noise
        return x_prev, pred_x0, e_t

    # ------------------------------------------------------------------ loop
    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        cond: Any,
        uncond: Any = None,
        *,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        noise: NoiseSource | None = None,
        generator: torch.Generator | None = None,
        return_intermediates: bool = False,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the DDIM loop from ``x_T`` and return the final latents.

        Args:
            model_fn: ``model_fn(x, t, cond) -> output`` (``t`` int64 [B]); see :func:`hybrid_model_fn`.
            x_T: the starting noise, e.g. ``[B, 4, T, H, W]``.
            cond: the conditioning passed to ``model_fn`` for the conditional call.
            uncond: the unconditional conditioning; ``None`` (or ``guidance_scale == 1``) means a
                single conditional call per step.
            guidance_scale: CFG scale (7.5 in the released settings).
            guidance_rescale: Lin et al. rescale weight (0.7 for 512/1024, 0 for 256).
            noise: the per-step noise, in loop order (index 0 = first step, at the largest t): a tensor
                ``[S, *x_T.shape]``, a sequence of ``S`` tensors, or ``noise(i, t, x) -> tensor``.
                ``None`` draws ``torch.randn`` (with ``generator``) once per step.
            generator: generator for the default noise.
            return_intermediates: also return a dict of per-step tensors stacked over the steps:
                ``step_t`` [S, B], ``z_before_step``, ``model_out_cond``, ``model_out_uncond`` (with
                guidance), ``model_output`` (guided), ``pred_x0`` (after dynamic rescale) and
                ``x_after_step``.
            callback: called as ``callback(i, t, x_after_step)`` after every step.

        Returns:
            The final latents, or ``(latents, intermediates)``.
        """
        use_cfg = uncond is not None and guidance_scale != 1.0
        x = x_T
        b = x.shape[0]
        rec: dict[str, list[torch.Tensor]] = {
            k: []
            for k in ("step_t", "z_before_step", "model_out_cond", "model_out_uncond", "model_output", "pred_x0",
                      "x_after_step")
        }
        total = self.total_steps
        for i, step in enumerate(self.step_timesteps()):
            index = total - 1 - i
            t = torch.full((b,), step, dtype=torch.long, device=x.device)
            cond_out = model_fn(x, t, cond)
            uncond_out = model_fn(x, t, uncond) if use_cfg else None
            out = self.guide(cond_out, uncond_out, guidance_scale, guidance_rescale)
            noise_i = step_noise(noise, i, t, x, generator)
            x_prev, pred_x0, _ = self.step(out, x, index, noise_i)
            if return_intermediates:
                rec["step_t"].append(t)
                rec["z_before_step"].append(x)
                rec["model_out_cond"].append(cond_out)
                if uncond_out is not None:
                    rec["model_out_uncond"].append(uncond_out)
                rec["model_output"].append(out)
                rec["pred_x0"].append(pred_x0)
                rec["x_after_step"].append(x_prev)
            x = x_prev
            if callback is not None:
                callback(i, step, x)
        if not return_intermediates:
            return x
        return x, {k: torch.stack(v) for k, v in rec.items() if v}
