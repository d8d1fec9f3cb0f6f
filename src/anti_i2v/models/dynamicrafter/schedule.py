"""DynamiCrafter's training noise schedule (the ``LatentVisualDiffusion`` schedule buffers).

Notation: ``T`` = ``timesteps`` (1000), ``t`` in ``0..T-1``, ``abar_t`` = ``alphas_cumprod[t]``.

* **Betas ("linear", LDM).** ``beta_t = linspace(sqrt(linear_start), sqrt(linear_end), T)[t] ** 2``,
  evaluated in float64 (this is diffusers' ``scaled_linear``); defaults 0.00085 -> 0.012.
* **Zero terminal SNR** (optional, 512/1024 models; Lin et al. 2023, Alg. 1). With
  ``s_t = sqrt(abar_t)`` of the betas above, shift and scale so that ``s_{T-1} = 0`` while ``s_0`` is kept:
  ``s'_t = (s_t - s_{T-1}) * s_0 / (s_0 - s_{T-1})``; then ``abar'_t = s'_t ** 2``,
  ``alpha'_0 = abar'_0``, ``alpha'_t = abar'_t / abar'_{t-1}`` and ``beta'_t = 1 - alpha'_t``
  (so ``beta'_{T-1} = 1`` and ``abar'_{T-1} = 0``).
* ``alphas_cumprod = cumprod(1 - beta)`` in float64. The tables exposed here are float32 roundings of
  the float64 values, like the original's registered buffers: ``alphas_cumprod``,
  ``alphas_cumprod_prev`` (``[1, abar_0, ..., abar_{T-2}]``), ``sqrt_alphas_cumprod = sqrt(abar)``
  and ``sqrt_one_minus_alphas_cumprod = sqrt(1 - abar)`` (square roots taken in float64).
* **Dynamic rescale** (optional, 512/1024): ``scale_arr = concat(linspace(1, base_scale, turning_step),
  full(T, base_scale))``, ``turning_step + T`` entries (1400 by default); only ``[0, T)`` is read.
  In training the clean latent is multiplied by ``scale_arr[t]`` before *both* the noising and the
  target (the original does ``x0 <- x0 * scale_arr[t]`` before calling its loss); the DDIM sampler
  multiplies its ``pred_x0`` by ``scale_arr[t_prev] / scale_arr[t]``.
* **Parameterisation** ``"v"`` (512/1024) or ``"eps"`` (256). With ``x0s = scale_arr[t] * x0``
  (``x0s = x0`` without dynamic rescale):

  - noising: ``z_t = sqrt(abar_t) * x0s + sqrt(1 - abar_t) * eps``;
  - v target: ``v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0s``;
  - from a v prediction: ``x0s_hat = sqrt(abar_t) * z_t - sqrt(1 - abar_t) * v`` and
    ``eps_hat = sqrt(abar_t) * v + sqrt(1 - abar_t) * z_t``;
  - from an eps prediction: ``x0s_hat = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)``.

The class holds plain tensors (CPU, float32 unless stated); the helpers move what they gather to the
device and dtype of their input. Nothing here is wrapped in ``torch.no_grad``: every helper is
differentiable in its tensor arguments.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["DynamiCrafterSchedule", "linear_betas", "rescale_zero_terminal_snr"]

Parameterization = Literal["v", "eps"]


def linear_betas(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """LDM "linear" betas: ``linspace(sqrt(linear_start), sqrt(linear_end), timesteps) ** 2`` (float64)."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale ``betas`` so that the last step has zero SNR (``alphas_cumprod[-1] == 0``), in float64.

    ``s = sqrt(cumprod(1 - betas))``; ``s <- (s - s[-1]) * s[0] / (s[0] - s[-1])``; ``abar = s**2``;
    ``alphas = [abar[0], abar[1:] / abar[:-1]]``; returns ``1 - alphas``.
    """
    betas = betas.to(torch.float64)
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class DynamiCrafterSchedule:
    """The diffusion schedule of a DynamiCrafter model, with the training and prediction formulas.

    Constructor arguments use the names of the original YAML (``model.params``). Presets for the
    released checkpoints: :meth:`for_variant`.

    Attributes (float32 CPU tensors of length ``timesteps`` unless noted): ``betas``,
    ``alphas_cumprod``, ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``alphas_cumprod_f64`` (float64), and ``scale_arr``
    (``turning_step + timesteps`` entries, or ``None`` without dynamic rescale).
    """

    def __init__(
        self,
        *,
        timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        beta_schedule: str = "linear",
        parameterization: Parameterization = "v",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_rescale: bool = False,
        base_scale: float | None = 0.7,
        turning_step: int | None = 400,
    ) -> None:
        if beta_schedule != "linear":
            raise ValueError(f"only the LDM 'linear' beta schedule is used by DynamiCrafter, got {beta_schedule!r}")
        if parameterization not in ("v", "eps"):
            raise ValueError(f"parameterization must be 'v' or 'eps', got {parameterization!r}")
        self.num_timesteps = int(timesteps)
        self.linear_start = float(linear_start)
        self.linear_end = float(linear_end)
        self.beta_schedule = beta_schedule
        self.parameterization: Parameterization = parameterization
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.use_dynamic_rescale = bool(use_dynamic_rescale)

        betas = linear_betas(self.num_timesteps, self.linear_start, self.linear_end)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_f64 = abar
        self.betas = betas.float()
        self.alphas_cumprod = abar.float()
        self.alphas_cumprod_prev = torch.cat([abar.new_ones(1), abar[:-1]]).float()
        self.sqrt_alphas_cumprod = abar.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt().float()

        self.base_scale: float | None = None
        self.turning_step: int | None = None
        self.scale_arr: torch.Tensor | None = None
        if self.use_dynamic_rescale:
            if base_scale is None or turning_step is None:
                raise ValueError("use_dynamic_rescale needs base_scale and turning_step")
            self.base_scale = float(base_scale)
            self.turning_step = int(turning_step)
            ramp = torch.linspace(1.0, self.base_scale, self.turning_step, dtype=torch.float64)
            flat = torch.full((self.num_timesteps,), self.base_scale, dtype=torch.float64)
            self.scale_arr = torch.cat([ramp, flat]).float()
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # ------------------------------------------------------------------ presets
    @classmethod
    def for_variant(cls, variant: str | int) -> DynamiCrafterSchedule:
        """Schedule of a released checkpoint: ``"512"`` / ``"1024"`` (v, zero-SNR, dynamic rescale with
        base_scale 0.7 / 0.3) or ``"256"`` (eps, no zero-SNR, no dynamic rescale)."""
        variant = str(variant)
        if variant in ("512", "512_interp"):
            return cls(parameterization="v", rescale_betas_zero_snr=True, use_dynamic_rescale=True, base_scale=0.7)
        if variant == "1024":
            return cls(parameterization="v", rescale_betas_zero_snr=True, use_dynamic_rescale=True, base_scale=0.3)
        if variant == "256":
            return cls(parameterization="eps", rescale_betas_zero_snr=False, use_dynamic_rescale=False)
        raise ValueError(f"unknown DynamiCrafter variant {variant!r} (expected 256, 512, 512_interp or 1024)")

    # ------------------------------------------------------------------ gathering
    def table(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The 1-D table ``name`` (e.g. ``"sqrt_alphas_cumprod"``) on ``like``'s device, in its float dtype."""
        dtype = like.dtype if like.is_floating_point() else torch.float32
        key = (name, like.device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            src = getattr(self, name)
            if src is None:
                raise ValueError(f"table {name!r} is not defined for this schedule")
            cached = src.to(device=like.device, dtype=dtype)
            self._cache[key] = cached
        return cached

    def extract(self, name: str, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """``table[t]`` reshaped to ``[B, 1, ..., 1]`` to broadcast against ``x`` (``t``: int or [B] / [] ints)."""
        tab = self.table(name, x)
        t = torch.as_tensor(t, device=x.device, dtype=torch.long)
        vals = tab[t.reshape(-1)]
        return vals.reshape(-1, *([1] * (x.dim() - 1)))

    # ------------------------------------------------------------------ formulas
    def rescale_x0(self, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """``x0 * scale_arr[t]`` with dynamic rescale, else ``x0`` unchanged."""
        if not self.use_dynamic_rescale:
            return x0
        return x0 * self.extract("scale_arr", t, x0)

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor, *, x0_rescaled: bool = False
    ) -> torch.Tensor:
        """Training noising: ``z_t = sqrt(abar_t) * x0s + sqrt(1 - abar_t) * noise``.

        ``x0s = scale_arr[t] * x0`` when dynamic rescale is on (pass ``x0_rescaled=True`` if ``x0`` is
        already multiplied), else ``x0``.
        """
        x0s = x0 if x0_rescaled else self.rescale_x0(x0, t)
        return self.extract("sqrt_alphas_cumprod", t, x0s) * x0s + self.extract(
            "sqrt_one_minus_alphas_cumprod", t, x0s
        ) * noise

    def v_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, *, x0_rescaled: bool = False
    ) -> torch.Tensor:
        """Velocity target ``v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0s`` (``x0s`` as in :meth:`q_sample`)."""
        x0s = x0 if x0_rescaled else self.rescale_x0(x0, t)
        return self.extract("sqrt_alphas_cumprod", t, x0s) * noise - self.extract(
            "sqrt_one_minus_alphas_cumprod", t, x0s
        ) * x0s

    def predict_x0_from_v(self, z: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
        """``x0_hat = sqrt(abar_t) * z_t - sqrt(1 - abar_t) * v`` (in the rescaled x0 space)."""
        return self.extract("sqrt_alphas_cumprod", t, z) * z - self.extract("sqrt_one_minus_alphas_cumprod", t, z) * v

    def predict_eps_from_v(self, z: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
        """``eps_hat = sqrt(abar_t) * v + sqrt(1 - abar_t) * z_t``."""
        return self.extract("sqrt_alphas_cumprod", t, z) * v + self.extract("sqrt_one_minus_alphas_cumprod", t, z) * z

    def predict_x0_from_eps(self, z: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """``x0_hat = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)`` (undefined at a zero-SNR ``t = T-1``)."""
        return (z - self.extract("sqrt_one_minus_alphas_cumprod", t, z) * eps) / self.extract(
            "sqrt_alphas_cumprod", t, z
        )

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, *, x0_rescaled: bool = False
    ) -> torch.Tensor:
        """The regression target of this parameterisation: :meth:`v_target` for ``"v"``, ``noise`` for ``"eps"``."""
        if self.parameterization == "v":
            return self.v_target(x0, noise, t, x0_rescaled=x0_rescaled)
        return noise

    def training_loss(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor | int,
        *,
        reduction: Literal["mean", "none", "per_sample"] = "mean",
        x0_rescaled: bool = False,
    ) -> torch.Tensor:
        """The diffusion training loss ``mean((model_output - target)^2)``.

        ``target`` is ``v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * scale_arr[t] * x0`` for v models
        and ``noise`` for eps models; ``model_output`` is the UNet's output for
        ``z_t = q_sample(x0, t, noise)``. ``reduction``: ``"mean"`` (scalar), ``"per_sample"`` ([B], mean
        over the other dims) or ``"none"`` (elementwise).
        """
        err = (model_output - self.target(x0, noise, t, x0_rescaled=x0_rescaled)) ** 2
        if reduction == "none":
            return err
        if reduction == "per_sample":
            return err.flatten(1).mean(dim=1)
        if reduction == "mean":
            return err.mean()
        raise ValueError(f"unknown reduction {reduction!r}")

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (float64; 0 at a zero-SNR final step)."""
        abar = self.alphas_cumprod_f64[torch.as_tensor(t, dtype=torch.long)]
        return abar / (1.0 - abar)

    def __repr__(self) -> str:
        extra = f", base_scale={self.base_scale}, turning_step={self.turning_step}" if self.use_dynamic_rescale else ""
        return (
            f"DynamiCrafterSchedule(timesteps={self.num_timesteps}, parameterization={self.parameterization!r}, "
            f"rescale_betas_zero_snr={self.rescale_betas_zero_snr}, use_dynamic_rescale={self.use_dynamic_rescale}"
            f"{extra})"
        )

