"""Rectified-flow sampling of Open-Sora 1.2, with image conditioning, and its training objective.

Written from the original release and the ``opensora_rflow`` fixture notes. The sampler
knows nothing about STDiT3: it calls ``model_fn(z, t, y, mask, x_mask, **model_kwargs) -> velocity``
(see :func:`stdit3_model_fn`, which adapts the port's ``STDiT3``; passing the model itself does the same
and also takes the null caption from its ``y_embedder.y_embedding`` buffer).

**Time convention.** ``t`` runs from 1000 (pure noise) to 0 (data):
``x_t = (1 - t/1000) * x0 + (t/1000) * noise`` and the velocity the model predicts is
``v = x0 - noise``, so one Euler step towards the data is ``z <- z + v * (t_i - t_{i+1}) / 1000``.

**Timesteps.** ``t_i = (1 - i/S) * 1000`` for ``i = 0..S-1`` as float32 ``[B]`` tensors, then (with
``use_timestep_transform``) :func:`timestep_transform`:
``ratio = sqrt(h*w / 512^2) * sqrt(n)`` with ``h, w`` the **pixel** size of the video and
``n = num_frames // 17 * 5`` (``n = 1`` when ``num_frames == 1``, checked on sample 0 like the
original), and ``t' = ratio * s / (1 + (ratio - 1) * s) * 1000`` with ``s = t/1000``. Everything is
evaluated in float32 in that order; this matters: at 64x72 pixels and 17 frames the first timestep
becomes 1000.0001, which the image-conditioning test below then treats differently from 1000.

**Image conditioning** (:func:`apply_reference` builds the inputs): the reference latent is written
into the first latent frame(s) of ``z`` and ``mask [B, T]`` (float) holds ``edit_ratio`` there (0 for
plain I2V) and 1 elsewhere. Per step ``i`` with timestep ``t``:

1. ``x0 = z``; ``x_mask = mask * 1000 >= t`` (True where the frame is denoised at this step).
2. One random draw ``eps_i`` with the shape of ``z`` (the only random number the sampler uses; inject it
   with ``noise``). Frames that became True at this step are replaced by
   ``(1 - t/1000) * x0 + (t/1000) * eps_i``. Before the first step the frames whose mask is exactly 1
   count as already noised, so this only fires for ``0 < edit_ratio < 1``, or after a first step whose
   transformed ``t`` exceeded 1000 (then no frame was True, and all of them "become" True at step 1).
3. CFG over the rows ``[cond; uncond]``: ``model_fn(cat([z, z]), cat([t, t]), cat([y, y_null]),
   text_mask repeated, x_mask repeated, fps/height/width repeated)``; the null caption is the model's
   ``y_embedding`` buffer repeated per sample, and it **reuses the prompt's text mask**.
   ``v = v_uncond + cfg_scale * (v_cond - v_uncond)``.
4. ``z <- z + v * (t_i - t_{i+1}) / 1000`` (the last step uses ``t_last / 1000``), then
   ``z <- where(x_mask, z, x0)``: conditioning frames are reset to the clean reference after every step.

Without a ``mask`` (text-to-video) steps 1, 2 and 4's reset are skipped and no random number is drawn.
Nothing is wrapped in ``torch.no_grad``: gradients flow through the loop if the caller wants them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from anti_i2v.models.sampling import NoiseSource, step_noise

__all__ = [
    "IMAGE_FPS",
    "RFlowSampler",
    "apply_reference",
    "make_timesteps",
    "multi_resolution_info",
    "rf_noisy",
    "rf_training_loss",
    "rf_training_target",
    "sample_training_timesteps",
    "stdit3_model_fn",
    "timestep_transform",
]

#: The ``fps`` the model gets for a single image (``num_frames == 1``), as the released inference.
IMAGE_FPS = 120

ModelFn = Callable[..., torch.Tensor]
Number = float | int
SizeArg = Number | torch.Tensor | Sequence[Number]


# ---------------------------------------------------------------------------------------------------
# timesteps
# ---------------------------------------------------------------------------------------------------


def _per_sample(value: SizeArg, batch_size: int, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """``value`` as a ``[batch_size]`` tensor of ``dtype`` (a scalar is repeated)."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device if device is not None else value.device, dtype=dtype).reshape(-1)
    elif isinstance(value, (int, float)):
        t = torch.tensor([value] * batch_size, dtype=dtype, device=device)
    else:
        t = torch.tensor(list(value), dtype=dtype, device=device)
    if t.numel() == 1 and batch_size != 1:
        t = t.expand(batch_size).clone()
    if t.numel() != batch_size:
        raise ValueError(f"expected {batch_size} per-sample values, got {t.numel()}")
    return t


def timestep_transform(
    t: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    num_frames: torch.Tensor,
    *,
    num_timesteps: int = 1000,
    scale: float = 1.0,
    base_resolution: int = 512 * 512,
    base_num_frames: int = 1,
) -> torch.Tensor:
    """Open-Sora's resolution- and length-aware shift of timesteps ``t`` (in ``[0, num_timesteps]``).

    ``height``, ``width`` and ``num_frames`` are per-sample tensors in **pixel** units (the video size,
    not the latent), float32 like the original's model arguments. ``num_frames == 1`` (checked on sample
    0) means an image and a time factor of 1; otherwise the factor is ``sqrt(num_frames // 17 * 5)``
    (17 frames -> 5 latent frames of the VAE). The arithmetic follows the original order in the
    tensors' dtype (see the module docstring).
    """
    s = t / num_timesteps
    ratio_space = (height * width / base_resolution).sqrt()
    if float(num_frames.reshape(-1)[0]) == 1:
        frames = torch.ones_like(num_frames)
    else:
        frames = num_frames // 17 * 5
    ratio_time = (frames / base_num_frames).sqrt()
    ratio = ratio_space * ratio_time * scale
    new_s = ratio * s / (1 + (ratio - 1) * s)
    return new_s * num_timesteps


def make_timesteps(
    num_sampling_steps: int,
    *,
    batch_size: int = 1,
    height: SizeArg | None = None,
    width: SizeArg | None = None,
    num_frames: SizeArg | None = None,
    num_timesteps: int = 1000,
    use_timestep_transform: bool = True,
    use_discrete_timesteps: bool = False,
    transform_scale: float = 1.0,
    info_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The sampling timesteps as a float32 tensor ``[S, B]`` (largest first).

    ``t_i = (1 - i/S) * num_timesteps`` (rounded to integers with ``use_discrete_timesteps``; they stay
    float32 here, where the original keeps int64 when no transform follows), then
    :func:`timestep_transform` with the pixel ``height``/``width``/``num_frames`` (required when
    ``use_timestep_transform``). ``info_dtype`` is the dtype of the size tensors (float32, as in the
    fixture).
    """
    if num_sampling_steps < 1:
        raise ValueError(f"num_sampling_steps must be >= 1, got {num_sampling_steps}")
    dev = torch.device(device) if device is not None else None
    values: list[float] = [(1.0 - i / num_sampling_steps) * num_timesteps for i in range(num_sampling_steps)]
    if use_discrete_timesteps:
        values = [float(int(round(v))) for v in values]
    steps = [torch.tensor([v] * batch_size, dtype=torch.float32, device=dev) for v in values]
    if use_timestep_transform:
        if height is None or width is None or num_frames is None:
            raise ValueError("the timestep transform needs height, width and num_frames (pixels)")
        h = _per_sample(height, batch_size, info_dtype, dev)
        w = _per_sample(width, batch_size, info_dtype, dev)
        n = _per_sample(num_frames, batch_size, info_dtype, dev)
        steps = [
            timestep_transform(s, h, w, n, num_timesteps=num_timesteps, scale=transform_scale) for s in steps
        ]
    return torch.stack(steps).to(torch.float32)


def multi_resolution_info(
    batch_size: int,
    height: SizeArg,
    width: SizeArg,
    num_frames: SizeArg,
    fps: SizeArg = 24,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The released inference's extra model arguments (``multi_resolution="STDiT2"``), ``[B]`` each.

    Keys ``height``, ``width``, ``num_frames``, ``ar`` (= height / width) and ``fps``; ``fps`` becomes
    :data:`IMAGE_FPS` (120) when ``num_frames == 1``. Only ``fps``, ``height`` and ``width`` reach STDiT3;
    ``height``/``width``/``num_frames`` also drive :func:`timestep_transform`.
    """
    dev = torch.device(device) if device is not None else None
    h = _per_sample(height, batch_size, dtype, dev)
    w = _per_sample(width, batch_size, dtype, dev)
    n = _per_sample(num_frames, batch_size, dtype, dev)
    f = _per_sample(fps, batch_size, dtype, dev)
    if float(n[0]) == 1:
        f = torch.full_like(f, IMAGE_FPS)
    ar = _per_sample([float(a) / float(b) for a, b in zip(h.tolist(), w.tolist())], batch_size, dtype, dev)
    return {"height": h, "width": w, "num_frames": n, "ar": ar, "fps": f}


# ---------------------------------------------------------------------------------------------------
# image conditioning
# ---------------------------------------------------------------------------------------------------


def apply_reference(
    z: torch.Tensor,
    ref: torch.Tensor,
    *,
    target_start: int = 0,
    ref_start: int = 0,
    length: int | None = None,
    edit_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write reference latent frames into ``z`` and build the per-frame I2V ``mask``.

    The released I2V path (mask strategy ``"0"`` = ``"0,0,0,0,1,0"``) is the default: latent frame 0 of
    ``z`` becomes the image latent and ``mask[:, 0] = edit_ratio = 0``; all other mask entries are 1.
    ``edit_ratio`` in ``(0, 1)`` lets those frames be re-noised from the reference once
    ``t <= edit_ratio * 1000`` (strategy ``"0,0,0,0,1,<edit_ratio>"``).

    Args:
        z: the initial noise ``[B, C, T, H, W]`` (not modified; a copy is returned).
        ref: the reference latent ``[B, C, Tr, H, W]`` or ``[C, Tr, H, W]`` (shared by the batch).
        target_start: first latent frame of ``z`` to overwrite (negative counts from the end).
        ref_start: first frame of ``ref`` to use.
        length: number of frames (default: the rest of ``ref``).
        edit_ratio: the mask value of the written frames.

    Returns:
        ``(z, mask)`` with ``mask`` float32 ``[B, T]``. (Open-Sora's loop references and ``align`` are not
        modelled: they only matter for multi-segment generation.)
    """
    if ref.dim() == 4:
        ref = ref.unsqueeze(0).expand(z.shape[0], *ref.shape)
    if ref.dim() != 5 or ref.shape[0] != z.shape[0] or ref.shape[1] != z.shape[1] or ref.shape[3:] != z.shape[3:]:
        raise ValueError(f"reference latent {tuple(ref.shape)} does not fit z {tuple(z.shape)}")
    frames = z.shape[2]
    start = target_start + frames if target_start < 0 else target_start
    n = ref.shape[2] - ref_start if length is None else length
    n = min(n, frames - start, ref.shape[2] - ref_start)
    if n <= 0 or start < 0:
        raise ValueError(f"no frame to write: target_start {target_start}, ref_start {ref_start}, length {length}")
    out = z.clone()
    out[:, :, start : start + n] = ref[:, :, ref_start : ref_start + n].to(z.dtype)
    mask = torch.ones(z.shape[0], frames, dtype=torch.float32, device=z.device)
    mask[:, start : start + n] = edit_ratio
    return out, mask


# ---------------------------------------------------------------------------------------------------
# training objective
# ---------------------------------------------------------------------------------------------------


def _bcast(t: torch.Tensor | Number, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([float(t)] * like.shape[0], device=like.device)
    t = t.reshape(-1)
    if t.numel() == 1 and like.shape[0] != 1:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def rf_noisy(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor | Number,
    *,
    frame_mask: torch.Tensor | None = None,
    num_timesteps: int = 1000,
) -> torch.Tensor:
    """The rectified-flow input ``x_t = (1 - t/1000) * x0 + (t/1000) * noise`` (``t`` per sample).

    ``frame_mask [B, T]`` (bool; True = noised/trained frame) gives the other frames the ``t = 0``
    input, i.e. the clean ``x0``, as Open-Sora's masked training does ("image_head" etc.). Computed
    as the original: ``a = 1 - t/1000``; ``a * x0 + (1 - a) * noise`` with ``t`` in float32.
    """
    tt = _bcast(t, x0).float() / num_timesteps
    a = 1 - tt
    xt = a * x0 + (1 - a) * noise
    if frame_mask is not None:
        keep = frame_mask.to(torch.bool)[:, None, :, None, None]
        xt = torch.where(keep, xt, x0.to(xt.dtype))
    return xt


def rf_training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | Number | None = None) -> torch.Tensor:
    """The velocity target ``x0 - noise`` (independent of ``t``; the argument is accepted for symmetry)."""
    return x0 - noise


def rf_training_loss(
    pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor | Number | None = None,
    frame_mask: torch.Tensor | None = None,
    *,
    reduction: Literal["mean", "per_sample"] = "mean",
) -> torch.Tensor:
    """Open-Sora's RF loss: MSE between the predicted velocity and ``x0 - noise``.

    ``pred`` may be the raw 8-channel STDiT3 output (only the first ``C`` channels, the velocity, are
    used). Per sample the squared error is averaged over all elements; with ``frame_mask [B, T]`` (True =
    trained frame) only the masked-in frames count: ``sum over those frames / (their count * C*H*W)``,
    the original ``mean_flat(..., mask)``. ``reduction="mean"`` averages the per-sample losses.
    """
    c = x0.shape[1]
    if pred.shape[1] == 2 * c:
        pred = pred[:, :c]
    err = (pred - rf_training_target(x0, noise, t)).pow(2)
    if frame_mask is None:
        per = err.mean(dim=list(range(1, err.dim())))
    else:
        if err.dim() != 5 or frame_mask.shape != (err.shape[0], err.shape[2]):
            raise ValueError(f"frame_mask {tuple(frame_mask.shape)} does not fit {tuple(err.shape)} ([B, T])")
        m = frame_mask.to(err.dtype)
        per_frame = err.sum(dim=(1, 3, 4))  # [B, T]
        denom = m.sum(dim=1) * (err.shape[1] * err.shape[3] * err.shape[4])
        per = (per_frame * m).sum(dim=1) / denom
    if reduction == "per_sample":
        return per
    if reduction == "mean":
        return per.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def sample_training_timesteps(
    batch_size: int,
    *,
    height: SizeArg | None = None,
    width: SizeArg | None = None,
    num_frames: SizeArg | None = None,
    num_timesteps: int = 1000,
    use_timestep_transform: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps ``[B]``: logit-normal ``sigmoid(N(0, 1)) * 1000``, then the same transform.

    This reproduces the distribution of Open-Sora's training, not its random stream.
    """
    dev = torch.device(device) if device is not None else None
    t = torch.sigmoid(torch.randn(batch_size, generator=generator, device=dev)) * num_timesteps
    if use_timestep_transform:
        if height is None or width is None or num_frames is None:
            raise ValueError("the timestep transform needs height, width and num_frames (pixels)")
        h = _per_sample(height, batch_size, torch.float32, dev)
        w = _per_sample(width, batch_size, torch.float32, dev)
        n = _per_sample(num_frames, batch_size, torch.float32, dev)
        t = timestep_transform(t, h, w, n, num_timesteps=num_timesteps)
    return t


# ---------------------------------------------------------------------------------------------------
# model adapter
# ---------------------------------------------------------------------------------------------------

_STDIT3_KWARGS = ("fps", "height", "width")


def stdit3_model_fn(model: Callable[..., torch.Tensor]) -> ModelFn:
    """``model_fn`` for the port's ``STDiT3``: returns the velocity (output channels ``0..C-1``).

    Calls ``model(z, t, y, mask=mask, x_mask=x_mask, fps=, height=, width=)``; other keyword arguments
    (``num_frames``, ``ar``) are dropped because STDiT3 ignores them.
    """

    def model_fn(
        z: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        x_mask: torch.Tensor | None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        kwargs = {k: v for k, v in model_kwargs.items() if k in _STDIT3_KWARGS}
        out = model(z, t, y, mask=mask, x_mask=x_mask, **kwargs)
        return out[:, : z.shape[1]]

    return model_fn


def _null_caption_of(model: Any) -> torch.Tensor | None:
    emb = getattr(getattr(model, "y_embedder", None), "y_embedding", None)
    return emb if isinstance(emb, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------------


class RFlowSampler:
    """Open-Sora 1.2's rectified-flow Euler sampler (``RFLOW``) with CFG and image conditioning.

    Args:
        num_sampling_steps: Euler steps ``S`` (30 in the released settings).
        num_timesteps: the training time range (1000).
        cfg_scale: classifier-free guidance scale (7.0).
        use_timestep_transform: apply :func:`timestep_transform` (True in the released settings).
        use_discrete_timesteps: round the raw timesteps to integers before the transform (False).
        transform_scale: extra factor on the transform ratio (1.0).
    """

    def __init__(
        self,
        num_sampling_steps: int = 30,
        num_timesteps: int = 1000,
        cfg_scale: float = 7.0,
        use_timestep_transform: bool = True,
        use_discrete_timesteps: bool = False,
        transform_scale: float = 1.0,
    ) -> None:
        self.num_sampling_steps = int(num_sampling_steps)
        self.num_timesteps = int(num_timesteps)
        self.cfg_scale = float(cfg_scale)
        self.use_timestep_transform = bool(use_timestep_transform)
        self.use_discrete_timesteps = bool(use_discrete_timesteps)
        self.transform_scale = float(transform_scale)

    def __repr__(self) -> str:
        return (
            f"RFlowSampler(num_sampling_steps={self.num_sampling_steps}, num_timesteps={self.num_timesteps}, "
            f"cfg_scale={self.cfg_scale}, use_timestep_transform={self.use_timestep_transform}, "
            f"use_discrete_timesteps={self.use_discrete_timesteps})"
        )

    def timesteps(
        self,
        batch_size: int,
        height: SizeArg | None = None,
        width: SizeArg | None = None,
        num_frames: SizeArg | None = None,
        *,
        info_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The float32 timesteps ``[S, B]`` for videos of ``height x width`` pixels and ``num_frames``."""
        return make_timesteps(
            self.num_sampling_steps,
            batch_size=batch_size,
            height=height,
            width=width,
            num_frames=num_frames,
            num_timesteps=self.num_timesteps,
            use_timestep_transform=self.use_timestep_transform,
            use_discrete_timesteps=self.use_discrete_timesteps,
            transform_scale=self.transform_scale,
            info_dtype=info_dtype,
            device=device,
        )

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - t/1000) * x0 + (t/1000) * noise`` per sample (see :func:`rf_noisy`)."""
        return rf_noisy(x0, noise, t, num_timesteps=self.num_timesteps)

    def sample(
        self,
        model: ModelFn | torch.nn.Module,
        z: torch.Tensor,
        y: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        height: SizeArg,
        width: SizeArg,
        num_frames: SizeArg,
        fps: SizeArg = 24,
        mask: torch.Tensor | None = None,
        y_null: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        noise: NoiseSource | None = None,
        generator: torch.Generator | None = None,
        info_dtype: torch.dtype = torch.float32,
        model_kwargs: Mapping[str, Any] | None = None,
        return_intermediates: bool = False,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the Euler loop from ``z`` and return the final latents ``[B, C, T, H, W]``.

        Args:
            model: ``model_fn(z, t, y, mask, x_mask, **model_kwargs) -> velocity`` (or the raw 8-channel
                output, whose first ``C`` channels are used), or an ``STDiT3`` module (wrapped with
                :func:`stdit3_model_fn`; its ``y_embedder.y_embedding`` is the default ``y_null``).
            z: the starting latent; for I2V the output of :func:`apply_reference`.
            y: caption features ``[B, 1, L, D]`` (T5 ``last_hidden_state``, see ``text.py``).
            text_mask: the T5 attention mask ``[B, L]`` (``None``: every token attends).
            height, width, num_frames: the **pixel** video size (scalars or ``[B]``); they drive the
                timestep transform and the model's positional-embedding scale.
            fps: frames per second for the model (120 is used when ``num_frames == 1``).
            mask: the per-latent-frame float mask ``[B, T]`` of :func:`apply_reference` (``None``: T2V).
            y_null: the null caption ``[L, D]`` (``y_embedding``) or ``[B, 1, L, D]``; required for CFG
                unless ``model`` is an STDiT3.
            guidance_scale: overrides ``cfg_scale``; exactly 1.0 runs the conditional branch only.
            noise: the per-step draws for re-noising (index 0 = first step): a tensor
                ``[S, *z.shape]``, a sequence, or ``noise(i, t, z) -> tensor``. ``None`` draws
                ``torch.randn`` (with ``generator``) once per step, only when ``mask`` is given.
            info_dtype: dtype of the size/fps tensors (float32, as the fixture).
            model_kwargs: extra keyword arguments for ``model_fn`` (not repeated for the CFG rows).
            return_intermediates: also return per-step tensors stacked over the steps: ``timesteps``
                ``[S, B]``, ``z_before_step`` (the model input, after re-noising), ``x_mask`` ``[S, 2B, T]``
                (what the model got; with a mask), ``pred_v`` (``[S, 2B, ...]`` rows ``[cond; uncond]``,
                or ``[S, B, ...]`` without CFG), ``v`` (guided) and ``z_after_step``.
            callback: called as ``callback(i, t, z_after_step)`` after every step.

        Returns:
            The final latents, or ``(latents, intermediates)``.
        """
        scale = self.cfg_scale if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        if isinstance(model, torch.nn.Module):
            if y_null is None:
                y_null = _null_caption_of(model)
            model_fn: ModelFn = stdit3_model_fn(model)
        else:
            model_fn = model
        if use_cfg and y_null is None:
            raise ValueError("classifier-free guidance needs y_null (the model's y_embedder.y_embedding)")

        b = z.shape[0]
        device = z.device
        info = multi_resolution_info(b, height, width, num_frames, fps, dtype=info_dtype, device=device)
        timesteps = self.timesteps(
            b, info["height"], info["width"], info["num_frames"], info_dtype=info_dtype, device=device
        )

        rows = 2 if use_cfg else 1
        if use_cfg:
            assert y_null is not None
            null = y_null if y_null.dim() == 4 else y_null[None, None]
            null = null.to(device=y.device, dtype=y.dtype).expand(b, *null.shape[1:])
            y_in = torch.cat([y, null], dim=0)
        else:
            y_in = y
        text_mask_in = None if text_mask is None else text_mask.repeat(rows, 1)
        fixed_kwargs = {k: info[k].repeat(rows) for k in _STDIT3_KWARGS}
        fixed_kwargs.update(model_kwargs or {})

        if mask is not None:
            if mask.shape != (b, z.shape[2]):
                raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] = [{b}, {z.shape[2]}]")
            noise_added = mask == 1
        rec: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("timesteps", "z_before_step", "x_mask", "pred_v", "v", "z_after_step")
        }

        num = timesteps.shape[0]
        for i in range(num):
            t = timesteps[i]
            x_mask_in = None
            if mask is not None:
                mask_t = mask * self.num_timesteps
                x0 = z.clone()
                eps = step_noise(noise, i, t, x0, generator)
                x_noise = self.add_noise(x0, eps, t)
                upper = mask_t >= t[:, None]
                x_mask_in = upper.repeat(rows, 1)
                fresh = upper & ~noise_added
                z = torch.where(fresh[:, None, :, None, None], x_noise, x0)
                noise_added = upper
            z_in = torch.cat([z] * rows, dim=0)
            t_in = torch.cat([t] * rows, dim=0)
            pred = model_fn(z_in, t_in, y_in, text_mask_in, x_mask_in, **fixed_kwargs)
            c = z.shape[1]
            if pred.shape[1] == 2 * c:
                pred = pred[:, :c]
            if use_cfg:
                pred_cond, pred_uncond = pred.chunk(2, dim=0)
                v = pred_uncond + scale * (pred_cond - pred_uncond)
            else:
                v = pred
            dt = (timesteps[i] - timesteps[i + 1]) if i < num - 1 else timesteps[i]
            dt = dt / self.num_timesteps
            z_next = z + v * dt[:, None, None, None, None]
            if mask is not None:
                z_next = torch.where(upper[:, None, :, None, None], z_next, x0)
            if return_intermediates:
                rec["timesteps"].append(t)
                rec["z_before_step"].append(z)
                if x_mask_in is not None:
                    rec["x_mask"].append(x_mask_in)
                rec["pred_v"].append(pred)
                rec["v"].append(v)
                rec["z_after_step"].append(z_next)
            z = z_next
            if callback is not None:
                callback(i, t, z)
        if not return_intermediates:
            return z
        return z, {k: torch.stack(v) for k, v in rec.items() if v}
