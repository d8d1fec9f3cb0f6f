"""The whole DynamiCrafter model under the original top-level names, and official-checkpoint loading.

:class:`DynamiCrafterModel` mirrors the module tree of the original ``LatentVisualDiffusion``
(the original release)::

    model.diffusion_model   UNetModel            (anti_i2v.models.dynamicrafter.unet, original key names)
    first_stage_model       diffusers AutoencoderKL       (vae.py; diffusers key names)
    cond_stage_model        OpenCLIPTextEncoder           (encoders.py; transformers key names)
    embedder                OpenCLIPImageEncoder          (encoders.py; transformers key names)
    image_proj_model        Resampler            (anti_i2v.models.dynamicrafter.resampler, original key names)
    betas, alphas_cumprod, ..., posterior_mean_coef2 [, scale_arr]   schedule buffers (original names)

The UNet, the Resampler and the buffers use the official names, so their keys map one to one. The VAE and
the two CLIP towers use library names internally; :meth:`DynamiCrafterModel.official_key_rules` composes
their key maps, so :meth:`~DynamiCrafterModel.load_official_state_dict` takes the checkpoint's
``state_dict`` as it is and :meth:`~DynamiCrafterModel.official_state_dict` gives it back.

Official keys that the port does not hold (:meth:`~DynamiCrafterModel.ignored_official_keys`, each with a
reason): ``cond_stage_model.model.transformer.resblocks.23.*`` (the penultimate-layer text encoder never runs
the last block), ``cond_stage_model.model.{text_projection,logit_scale}``, ``embedder.model.visual.proj``
and the text-tower leftovers ``embedder.model.{token_embedding.weight,positional_embedding,ln_final.*,
text_projection,logit_scale}``. Every other checkpoint key must be present and have the right shape.

The UNet and Resampler classes are imported when a model is built, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from anti_i2v.errors import ModelError
from anti_i2v.models.dynamicrafter.checkpoint import KeyRule, identity_rules, normalize_official_keys
from anti_i2v.models.dynamicrafter.configs import DynamiCrafterConfig, get_config
from anti_i2v.models.dynamicrafter.encoders import (
    OpenCLIPImageEncoder,
    OpenCLIPTextEncoder,
    load_clip_tokenizer,
    tiny_clip_tokenizer,
    tokenize,
)
from anti_i2v.models.dynamicrafter.schedule import DynamiCrafterSchedule, linear_betas, rescale_zero_terminal_snr
from anti_i2v.models.dynamicrafter.vae import build_vae, decode_video, encode_video, vae_key_rules

__all__ = ["SCHEDULE_BUFFERS", "DynamiCrafterModel", "LoadReport", "schedule_buffers"]

#: Names of the schedule buffers of the original ``DDPM`` (``scale_arr`` only with dynamic rescale).
SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def schedule_buffers(cfg: DynamiCrafterConfig) -> dict[str, torch.Tensor]:
    """The DDPM buffers of ``cfg`` (float32 roundings of float64 values, as the original registers them).

    LDM "linear" betas ``linspace(sqrt(start), sqrt(end), T) ** 2``, optionally rescaled to zero terminal
    SNR; the posterior terms of ``q(x_{t-1} | x_t, x_0)`` with ``v_posterior = 0``;
    ``sqrt_recip_alphas_cumprod`` and ``sqrt_recipm1_alphas_cumprod`` are zeros for v-prediction (the
    original registers zeros there, since ``1 / alphas_cumprod`` is infinite at a zero-SNR last step);
    ``scale_arr = concat(linspace(1, base_scale, turning_step), full(T, base_scale))`` with dynamic rescale.
    The checkpoint holds the same buffers; loading it overwrites these values.
    """
    with torch.device("cpu"):  # plain tables, also when the model is built on the meta device
        betas = linear_betas(int(cfg.timesteps), cfg.linear_start, cfg.linear_end)
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        out = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - abar),
        }
        if cfg.parameterization == "v":
            out["sqrt_recip_alphas_cumprod"] = torch.zeros_like(abar)
            out["sqrt_recipm1_alphas_cumprod"] = torch.zeros_like(abar)
        else:
            out["sqrt_recip_alphas_cumprod"] = (1.0 / abar).sqrt()
            out["sqrt_recipm1_alphas_cumprod"] = (1.0 / abar - 1.0).sqrt()
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        out["posterior_variance"] = post_var
        out["posterior_log_variance_clipped"] = torch.log(post_var.clamp(min=1e-20))
        out["posterior_mean_coef1"] = betas * abar_prev.sqrt() / (1.0 - abar)
        out["posterior_mean_coef2"] = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)
        if cfg.use_dynamic_rescale:
            schedule = DynamiCrafterSchedule(
                timesteps=int(cfg.timesteps), linear_start=cfg.linear_start, linear_end=cfg.linear_end,
                use_dynamic_rescale=True, base_scale=cfg.base_scale, turning_step=cfg.turning_step,
            )
            out["scale_arr"] = schedule.scale_arr
    return {k: v.to(torch.float32) for k, v in out.items()}


def _unet_class() -> type[nn.Module]:
    try:
        from anti_i2v.models.dynamicrafter.unet import UNetModel
    except ImportError as err:
        raise ModelError(f"the DynamiCrafter UNet is unavailable ({err}); reinstall anti-i2v") from None
    return UNetModel


def _resampler_class() -> type[nn.Module]:
    try:
        from anti_i2v.models.dynamicrafter.resampler import Resampler
    except ImportError as err:
        raise ModelError(f"the DynamiCrafter Resampler is unavailable ({err}); reinstall anti-i2v") from None
    return Resampler


class _DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` so its keys read ``model.diffusion_model.*``."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.diffusion_model(*args, **kwargs)


@dataclass
class LoadReport:
    """What :meth:`DynamiCrafterModel.load_official_state_dict` did."""

    loaded: int
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _examples(keys: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(list(keys)[:n])
    return shown + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


class DynamiCrafterModel(nn.Module):
    """DynamiCrafter (``LatentVisualDiffusion``) with the original top-level module names.

    ``DynamiCrafterModel("512")`` builds the full 512 model with random weights (use the ``torch.device
    ("meta")`` context to build it without memory); :meth:`from_official` builds it and loads an official
    state dict (see :func:`~anti_i2v.models.dynamicrafter.checkpoint.load_checkpoint`) with little extra
    memory. ``DynamiCrafterModel("tiny")`` is a small random model for CPU tests.
    """

    def __init__(self, config: DynamiCrafterConfig | str | int = "512") -> None:
        super().__init__()
        cfg = get_config(config)
        self.config = cfg
        self.scale_factor = float(cfg.scale_factor)
        self.model = _DiffusionWrapper(_unet_class()(**cfg.unet))
        self.first_stage_model = build_vae(**cfg.vae, scale_factor=cfg.scale_factor)
        self.cond_stage_model = OpenCLIPTextEncoder(**cfg.text)
        self.embedder = OpenCLIPImageEncoder(**cfg.vision)
        self.image_proj_model = _resampler_class()(**cfg.resampler)
        for name, value in schedule_buffers(cfg).items():
            self.register_buffer(name, value)
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ key maps
    def official_key_rules(self) -> list[KeyRule]:
        """One rule per official checkpoint key that the port loads (official name -> our name(s))."""
        rules = identity_rules(f"model.diffusion_model.{k}" for k in self.model.diffusion_model.state_dict())
        rules += [r.with_prefix("first_stage_model.", "first_stage_model.") for r in vae_key_rules(self.first_stage_model)]
        rules += [r.with_prefix("cond_stage_model.", "cond_stage_model.") for r in self.cond_stage_model.key_rules()]
        rules += [r.with_prefix("embedder.", "embedder.") for r in self.embedder.key_rules()]
        rules += identity_rules(f"image_proj_model.{k}" for k in self.image_proj_model.state_dict())
        rules += identity_rules(name for name, _ in self.named_buffers(recurse=False) if name not in self._non_persistent_buffers_set)
        return rules

    def ignored_official_keys(self) -> dict[str, str]:
        """Official keys present in the checkpoint but not used by the port, each with the reason."""
        out = {f"cond_stage_model.{k}": why for k, why in self.cond_stage_model.ignored_keys().items()}
        out.update({f"embedder.{k}": why for k, why in self.embedder.ignored_keys().items()})
        return out

    def official_to_ours(self, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> tuple[dict[str, torch.Tensor], LoadReport]:
        """Rename (and split/reshape) an official state dict into this module's names, without loading it.

        Raises :class:`~anti_i2v.errors.ModelError` when ``strict`` and keys are missing or unexpected
        (ignoring :meth:`ignored_official_keys`), or when a shape does not match this model.
        """
        state = normalize_official_keys(state)
        rules = self.official_key_rules()
        ignored = self.ignored_official_keys()
        missing = [r.official for r in rules if r.official not in state]
        known = {r.official for r in rules}
        unexpected = [k for k in state if k not in known and k not in ignored]
        report = LoadReport(
            loaded=0, ignored=[k for k in state if k in ignored], missing=missing, unexpected=unexpected
        )
        if strict and (missing or unexpected):
            err = ModelError(
                f"checkpoint does not match DynamiCrafter {self.config.name}: "
                f"{len(missing)} missing keys [{_examples(missing)}], "
                f"{len(unexpected)} unexpected keys [{_examples(unexpected)}]; "
                "check that the checkpoint and the variant agree"
            )
            err.missing, err.unexpected = missing, unexpected  # type: ignore[attr-defined]
            raise err
        expected_shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        ours: dict[str, torch.Tensor] = {}
        bad: list[str] = []
        for rule in rules:
            if rule.official not in state:
                continue
            tensor = state[rule.official]
            try:
                parts = rule.to_ours(tensor)
            except ValueError:
                parts = []
            if len(parts) != len(rule.ours) or any(
                tuple(p.shape) != expected_shapes[k] for k, p in zip(rule.ours, parts)
            ):
                bad.append(f"{rule.official} {tuple(tensor.shape)}")
                continue
            ours.update(zip(rule.ours, parts))
        if bad:
            raise ModelError(
                f"checkpoint shapes do not match DynamiCrafter {self.config.name} at {len(bad)} keys "
                f"[{_examples(bad, 4)}]; check that the checkpoint and the variant agree"
            )
        report.loaded = len(ours)
        return ours, report

    def load_official_state_dict(
        self, state: Mapping[str, torch.Tensor], *, strict: bool = True, assign: bool = False
    ) -> LoadReport:
        """Load an official ``state_dict`` (checkpoint names) into this model; strict by default.

        ``assign=True`` assigns the checkpoint tensors instead of copying them (for a model built on the
        meta device; see :meth:`from_official`).
        """
        ours, report = self.official_to_ours(state, strict=strict)
        result = self.load_state_dict(ours, strict=strict, assign=assign)
        if strict and (result.missing_keys or result.unexpected_keys):  # pragma: no cover - rules cover all keys
            raise ModelError(f"internal key-map error: {result}; please report it")
        return report

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the official checkpoint names (ignored keys are not produced)."""
        mine = self.state_dict()
        return {rule.official: rule.to_official([mine[k] for k in rule.ours]) for rule in self.official_key_rules()}

    @classmethod
    def from_official(
        cls,
        state: Mapping[str, torch.Tensor],
        config: DynamiCrafterConfig | str | int,
        *,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str = "cpu",
        low_memory: bool = True,
    ) -> DynamiCrafterModel:
        """Build ``config`` and load the official ``state`` strictly; returns the model in eval mode.

        With ``low_memory`` the model is built on the meta device and the (converted) checkpoint tensors
        are assigned, so no random weights are allocated; the few non-persistent buffers (CLIP
        ``position_ids``) are then recreated. ``dtype`` casts floating-point tensors (``None`` keeps them).
        """
        def cast(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device)

        state = {k: cast(v) for k, v in normalize_official_keys(state).items()}
        if not low_memory:
            model = cls(config)
            model.load_official_state_dict(state)
            return model.to(device=device).eval()
        with torch.device("meta"):
            model = cls(config)
        model.load_official_state_dict(state, assign=True)
        model._rebuild_meta_buffers(torch.device(device))
        return model.eval()

    def _rebuild_meta_buffers(self, device: torch.device) -> None:
        for mod_name, module in self.named_modules():
            for name, buf in list(module._buffers.items()):
                if buf is None or not buf.is_meta:
                    continue
                if name == "position_ids":
                    value = torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()
                else:
                    raise ModelError(
                        f"buffer {mod_name}.{name} is not in the checkpoint and cannot be rebuilt; "
                        "use from_official(..., low_memory=False)"
                    )
                module._buffers[name] = value

    # ------------------------------------------------------------------ conditioning helpers
    @property
    def tokenizer(self) -> Any:
        """The CLIP tokenizer (loaded on first use: the hub tokenizer, or the in-memory tiny one)."""
        if self._tokenizer is None:
            self._tokenizer = tiny_clip_tokenizer() if self.config.tokenizer is None else load_clip_tokenizer(self.config.tokenizer)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        ids = tokenize(self.tokenizer, prompts, self.cond_stage_model.context_length)
        if int(ids.max()) >= self.cond_stage_model.vocab_size:
            raise ModelError("the tokenizer produced ids beyond the text encoder's vocabulary; use the matching tokenizer")
        return ids

    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> text context ``[B, 77, context_dim]`` (penultimate layer + final layer norm)."""
        device = next(self.cond_stage_model.parameters()).device
        return self.cond_stage_model(self.tokenize(prompts).to(device))

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` ``[B, 3, H, W]`` -> image context ``[B, num_queries * frames, context_dim]``."""
        return self.image_proj_model(self.embedder(images))

    def encode_first_stage(self, video: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Video ``[B, 3, T, H, W]`` in ``[-1, 1]`` -> scaled latents (see :func:`~.vae.encode_video`)."""
        kwargs.setdefault("chunk_size", 1 if self.config.perframe_ae else None)
        return encode_video(self.first_stage_model, video, scale_factor=self.scale_factor, **kwargs)

    def decode_first_stage(self, latents: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Scaled latents ``[B, 4, T, h, w]`` -> video (see :func:`~.vae.decode_video`)."""
        kwargs.setdefault("chunk_size", 1 if self.config.perframe_ae else None)
        return decode_video(self.first_stage_model, latents, scale_factor=self.scale_factor, **kwargs)
