"""`ProtectConfig`: every hyper-parameter of a protection run, and the presets.

Every budget and RGB step size is in [0, 1] pixel units: ``eps=8/255`` means a pixel
may move by at most 8 levels of 255. Where the paper leaves a value unknown, the
default below is ours and is marked "(ours)".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anti_i2v.errors import ConfigError

if TYPE_CHECKING:
    from anti_i2v.models.base import VideoModel

DEFAULT_AUX_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_PROMPT = "a person moving naturally, looking at the camera, high quality video"

# eps (in [0, 1] units), steps and early stopping of each preset, shown in `anti-i2v protect --help`.
# Chosen from the strength-against-steps curves on the trained testbeds (docs/results/steps.md):
# with its step rule (`methods.step_for_run_length`) the default's video effect at 5 steps is 96
# to 98% of its effect at 200 on both testbeds (10 steps add 1 to 2% for twice the time), and 3
# steps give 93 to 94%, still well above AdvDM's at 60. Its loss keeps falling slowly after the
# video has stopped moving, so a loss-based stop runs long: `strong` alone stops early.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"eps": 8 / 255, "steps": 3},
    "balanced": {"eps": 8 / 255, "steps": 5},
    "strong": {"eps": 8 / 255, "steps": 200, "early_stop": 20},
}
DEFAULT_PRESET = "balanced"

# The presets' route on long videos, for the methods that take it (`Method.long_video_route`):
# optimising on a quarter of the denoiser's frames, spread over the video, and for `balanced` one
# last step on every frame. On the 49-frame CogVideoX testbed (13 latent frames, as
# CogVideoX-5B-I2V), over three seeds, `balanced`'s route gave 93% of 60 steps on every frame,
# about 3% less than every-frame `balanced`, in about a third of its time (48 s per CogVideoX-5B
# photo instead of 130 by the estimate); `fast`'s gave 91% (seed 0), more than every-frame `fast`,
# in about a fifth (docs/results/speed.md, "The presets on long videos"). A model's video is long
# when that quarter, spread, still keeps LONG_VIDEO_MIN_FRAMES frames: on 3 latent frames, keeping
# 2 cost 7 to 9% of the effect. The frames are spread by `frame_spread`'s default, as only models
# that can spread them have long videos.
LONG_VIDEO_SHARE = 0.25
LONG_VIDEO_MIN_FRAMES = 3
LONG_VIDEO_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"steps": 5, "frame_share": LONG_VIDEO_SHARE},
    "balanced": {"steps": 6, "frame_share": LONG_VIDEO_SHARE, "full_frame_steps": 1},
}

# How much of a model sits on the accelerator at once (`anti_i2v.memory` sets a model up for each).
MEMORY_MODES: dict[str, str] = {
    "max": "as full, and the sampler's activations kept instead of recomputed (about a fifth less work per step; 80 GB cards)",
    "full": "every weight on the GPU, the sampler's passes recomputed in the backward pass",
    "offload": "text encoder on the CPU, denoiser checkpointed (24 GB cards)",
    "sequential": "as offload, and the denoiser's blocks streamed to the GPU one at a time (12 GB cards, slower)",
}
DEFAULT_MEMORY_MODE = "full"
STEP_SCHEDULES = ("constant", "cosine")
SAMPLER_UNCONDITIONAL = ("tracked", "detached")


def is_long_video(models: Sequence[VideoModel]) -> bool:
    """Whether the presets take their long-video route on ``models``: each keeps at least
    `LONG_VIDEO_MIN_FRAMES` of its frames when optimising on a `LONG_VIDEO_SHARE` of them spread."""
    return bool(models) and all(
        m.spread_frames_kept(LONG_VIDEO_SHARE) >= LONG_VIDEO_MIN_FRAMES for m in models
    )


def parse_eps(value: str | float) -> float:
    """Parse a budget such as ``"8/255"``, ``"0.03"`` or ``0.03`` into [0, 1] units."""
    if isinstance(value, (int, float)):
        eps = float(value)
    else:
        top, _, bottom = value.strip().partition("/")  # "8/255", "3.5/255" or "0.031"
        try:
            eps = float(top) / float(bottom or 1)
        except (ValueError, ZeroDivisionError) as err:
            raise ConfigError(f"cannot read eps '{value}': write it like 8/255 or 0.031") from err
    if not 1 / 255 <= eps <= 64 / 255:
        raise ConfigError(
            f"eps {eps:.4f} is outside [1/255, 64/255]: budgets are in [0, 1] pixel units (below 1/255 a "
            "saved 8-bit photo cannot change), so 8/255 (about 0.031) is the usual choice"
        )
    return eps


def format_eps(eps: float) -> str:
    """Format a budget as ``"8/255 (0.0314)"``."""
    return f"{eps * 255:g}/255 ({eps:.4f})"


def describe_steps(settings: Mapping[str, Any], spread: str = "") -> str:
    """``"6 steps: 5 on 25% of the frames, then 1 on every frame"``: the steps of ``settings`` (a
    preset's or `ProtectConfig.to_dict`) and the frames they optimise on (``spread`` follows the
    share, e.g. ", spread")."""
    steps, share = settings["steps"], settings.get("frame_share", 1.0)
    full = settings.get("full_frame_steps", 0)
    if share >= 1:
        return f"{steps} steps"
    if not full:
        return f"{steps} steps on {share:.0%} of the frames{spread}"
    return f"{steps} steps: {steps - full} on {share:.0%} of the frames{spread}, then {full} on every frame"


def describe_preset(name: str) -> str:
    """``"strong: eps 8/255 (0.0314), 200 steps, or fewer: ..."`` for help texts and the web page."""
    preset = PRESETS[name]
    stop = f", or fewer: stops once {preset['early_stop']} steps gain nothing" if preset.get("early_stop") else ""
    route = LONG_VIDEO_PRESETS.get(name)
    if route:
        stop += f"; on long videos (CogVideoX-5B) {describe_steps(route, ', spread')}"
    return f"{name}: eps {format_eps(preset['eps'])}, {preset['steps']} steps{stop}"


@dataclass
class ProtectConfig:
    """All settings of one protection; `to_dict` is the reproducible record.

    Attributes:
        method: protection method (see `anti_i2v.methods`): "anti-i2v", an ablation or a baseline.
        eps: L-infinity budget in [0, 1] units, checked on the saved file.
        steps: sign-PGD steps.
        space: where the perturbation lives: "dual" (Lab a*b* and DCT low band,
            alternating; the paper's), "lab", "dct" or "rgb".
        step_size, lab_step_size, dct_step_size: step of each stage in its own units
            (RGB in [0, 1]; Lab in a*/b* units, on gray photos in L* units scaled to move pixels
            alike; None picks the calibrated default of the space).
        dct_band: share of the lowest DCT frequencies that may change, per axis (ours: 0.25).
        dct_block: 8 for JPEG-like 8x8 tiles, 0 for one global DCT (ours: 8).
        dual_period: steps per stage before Dual switches (ours: 1).
        t_min, t_max: range of diffusion timesteps sampled uniformly each step.
        seed: seeds every random draw (timesteps, noise, posterior samples).
        prompt: text condition used while optimising.
        weight_irc, weight_ira, weight_dm, weight_aux: loss weights (unit weights, as
            the paper writes the sum). ``weight_aux=None`` (default) turns the auxiliary
            CLIP term on with weight 1 when ``aux_model``'s weights are present locally,
            and off (with a log line saying so) when they are not: none are bundled.
        weight_div: weight of the output divergence, maximised (ours): how far the denoiser's
            noise prediction with the protected photo moves from the one with the clean photo,
            on the same noised reference video (see `objectives.divergence`).
        weight_latent: weight of the image-latent push, maximised (ours): how far the VAE
            latent of the protected photo moves from the clean photo's.
        weight_sampler: weight of the sampler divergence, maximised (ours): how far a short
            deterministic sampler run from noise lands from the clean photo's run from the same noise
            (``sampler_steps`` denoiser passes, differentiated through), with the model's own
            classifier-free guidance where it has one (``sampler_guidance``).
        sampler_noise_pool: a speed lever of the sampler divergence (ours): 0 draws fresh noise
            every step and runs the clean photo's sampler from it; K > 0 draws K noises once, each
            step picks one of them, and the clean photo's sampler runs from a noise once, on its
            first pick (a run of fewer steps than noises pays only for those it draws), saving the
            clean run (about a third of a step on the CPU, a fifth on a GPU). The `anti-i2v`
            method uses 2 on every family (it held the strength on both trained testbeds).
        sampler_grad_steps: a speed lever of the sampler divergence (ours): 0 differentiates
            through every sampler step; k > 0 runs the first steps without gradients and
            differentiates through the last k only (the loss is the same, the gradient a truncated one);
            k >= ``sampler_steps`` is every step. Measured weaker on CogVideoX: no default.
        sampler_unconditional: a speed lever of the sampler divergence (ours): "tracked"
            differentiates through the guidance (unconditional) branch of each sampler step;
            "detached" runs it without gradients, the same loss for about three eighths less
            work per step on a GPU. Measured weaker on CogVideoX: no default.
        sampler_guided_steps: a speed lever of the sampler divergence (ours): 0 guides every
            sampler step; k > 0 the first k only, k < 0 the last -k (an unguided step runs one
            denoiser pass instead of two; the objective changes, for the clean run as well).
        irc_shallow, irc_deep: IRC pulls the deep blocks' features to the shallow block's;
            indices, negative from the end. None picks them from the model's depth: the paper's
            block 3 and last three blocks where the model has three blocks after block 3,
            else an earlier anchor (see `objectives.irc.default_irc_blocks`).
        ira_blocks: denoiser blocks pulled toward the target image (None: irc_deep).
        ira_vae_layers: VAE-encoder layers pulled toward the target (None: all encoder blocks).
        target: path of the IRA target image psi (None: a pattern generated in code).
        reference: reference video of the diffusion loss: "repeat" (the photo over all
            frames), "generate" (one clean generation, cached) or a video file path.
        reference_steps: sampling steps when reference == "generate".
        aux_model: hub id or local folder of the CLIP vision model of the auxiliary term.
        min_psnr: a second, visibility budget (ours): the saved photo's PSNR to the original
            (8-bit levels) is at least this many dB; once the optimisation ends, the
            perturbation is scaled down as little as needed to meet it. None or 0: the
            L-infinity budget alone.
        step_schedule: "constant" step sizes, or "cosine": each stage's step decays along a
            half cosine from its size to a tenth of it by the last step (ours), so that the last
            steps settle pixels rather than push every one to the edge of the budget.
        momentum: decay of the gradient momentum of the sign steps (MI-FGSM, ours); 0 is
            plain sign-PGD.
        random_start: start from uniform noise in the eps ball instead of the photo.
        eot: expectation over transformations (ours): comma-separated random, differentiable
            transforms applied to what the model sees at each step, as an attacker's upload
            channel would ("jpeg", "resize", "blur", "noise"; "" for none; see `anti_i2v.eot`).
        through_resize: optimise what the model sees after the perturbation is carried
            to the full-size photo and that photo is resized to the model's input, rather
            than the model-resolution image itself (ours; see docs/method.md).
        checkpoint_every: save optimisation state every N steps (0: never).
        early_stop: stop once the smoothed loss has gained at most ``early_stop_tolerance``
            of its total gain over the last this many steps (0: always run every step;
            see `anti_i2v.early_stop`).
        early_stop_tolerance: share of the run's total gain below which a window is flat.
        frame_share: optimise on about this share of the model's frames (ours; a speed lever:
            the denoiser's cost grows with the frames); the videos an attacker generates keep
            every frame. 1: all frames.
        frame_spread: with ``frame_share`` < 1, optimise on frames spread evenly over the whole
            video, each at its own position (a lower frame rate; True), or on the first ones
            (False). None: spread where the model keeps each frame's position (CogVideoX), the
            first frames elsewhere.
        full_frame_steps: with ``frame_share`` < 1, the last this many of the ``steps`` run on
            every frame, from where the steps on the share left off (ours: one such step carries
            the protection to the frames the share skipped); early stopping watches only the steps
            on the share. 0: none.
        model_weights: with several models, the weight of each one's objective in the
            sum, in the order the models are given (None: all 1).
    """

    method: str = "anti-i2v"
    eps: float = PRESETS[DEFAULT_PRESET]["eps"]
    steps: int = PRESETS[DEFAULT_PRESET]["steps"]
    space: str = "dual"
    step_size: float | None = None
    lab_step_size: float | None = None
    dct_step_size: float | None = None
    dct_band: float = 0.25
    dct_block: int = 8
    dual_period: int = 1
    t_min: int = 0
    t_max: int = 999
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    weight_irc: float = 1.0
    weight_ira: float = 1.0
    weight_dm: float = 1.0
    weight_aux: float | None = None
    weight_div: float = 0.0
    weight_latent: float = 0.0
    weight_sampler: float = 0.0
    sampler_steps: int = 4
    sampler_guidance: bool = True
    sampler_noise_pool: int = 0
    sampler_grad_steps: int = 0
    sampler_unconditional: str = "tracked"
    sampler_guided_steps: int = 0
    irc_shallow: int | None = None
    irc_deep: tuple[int, ...] | None = None
    ira_blocks: tuple[int, ...] | None = None
    ira_vae_layers: tuple[str, ...] | None = None
    target: str | None = None
    reference: str = "repeat"
    reference_steps: int = 50
    aux_model: str = DEFAULT_AUX_MODEL
    min_psnr: float | None = None
    step_schedule: str = "constant"
    momentum: float = 0.0
    random_start: bool = False
    eot: str = ""
    through_resize: bool = True
    checkpoint_every: int = 0
    early_stop: int = 0
    early_stop_tolerance: float = 0.02
    frame_share: float = 1.0
    frame_spread: bool | None = None
    full_frame_steps: int = 0
    model_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.eps = parse_eps(self.eps)
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1 (got {self.steps})")
        for name in ("step_size", "lab_step_size", "dct_step_size"):
            size = getattr(self, name)
            if size is not None and not (isinstance(size, (int, float)) and size > 0):
                raise ConfigError(f"{name} is a step length > 0, or None for the method's (got {size})")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every is a number of steps >= 0, 0 for never (got {self.checkpoint_every})")
        if not 0 <= self.t_min <= self.t_max:
            raise ConfigError(f"need 0 <= t_min <= t_max (got {self.t_min}, {self.t_max})")
        if not 0 < self.dct_band <= 1:
            raise ConfigError(f"dct_band is a share of frequencies in (0, 1] (got {self.dct_band})")
        if self.dual_period < 1:
            raise ConfigError(f"dual_period must be at least 1 (got {self.dual_period})")
        if not (self.weight_irc or self.weight_ira or self.weight_dm or self.weight_aux or self.weight_div
                or self.weight_latent or self.weight_sampler):
            raise ConfigError("every loss weight is 0, so there is nothing to optimise; keep at least one non-zero")
        if self.reference not in ("repeat", "generate") and not Path(self.reference).is_file():
            raise ConfigError(
                f"reference '{self.reference}' is neither 'repeat', 'generate' nor an existing video file"
            )
        if self.irc_deep is not None:
            self.irc_deep = tuple(self.irc_deep)
        if self.sampler_steps < 1:
            raise ConfigError(f"sampler_steps must be at least 1 (got {self.sampler_steps})")
        if self.sampler_noise_pool < 0:
            raise ConfigError(f"sampler_noise_pool is a number of noises >= 0 (got {self.sampler_noise_pool})")
        if self.sampler_grad_steps < 0:
            raise ConfigError(f"sampler_grad_steps is a number of steps >= 0, 0 for all (got {self.sampler_grad_steps})")
        if self.sampler_unconditional not in SAMPLER_UNCONDITIONAL:
            raise ConfigError(
                f"sampler_unconditional is one of {', '.join(SAMPLER_UNCONDITIONAL)} (got '{self.sampler_unconditional}')"
            )
        if self.min_psnr and not 10 <= self.min_psnr <= 60:
            raise ConfigError(f"min_psnr is in dB, between 10 and 60, or 0 for none (got {self.min_psnr})")
        if self.step_schedule not in STEP_SCHEDULES:
            raise ConfigError(f"step_schedule is one of {', '.join(STEP_SCHEDULES)} (got '{self.step_schedule}')")
        if self.early_stop < 0 or not 0 <= self.early_stop_tolerance < 1:
            raise ConfigError(
                f"early_stop is a number of steps >= 0 and its tolerance a share in [0, 1) "
                f"(got {self.early_stop}, {self.early_stop_tolerance})"
            )
        if not 0 < self.frame_share <= 1:
            raise ConfigError(f"frame_share is a share of the model's frames in (0, 1] (got {self.frame_share})")
        if not 0 <= self.full_frame_steps <= self.steps:
            raise ConfigError(f"full_frame_steps is a number of the {self.steps} steps, from 0 to {self.steps} "
                              f"(got {self.full_frame_steps})")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum is a decay in [0, 1) (got {self.momentum})")
        from anti_i2v.eot import parse_eot

        self.eot = ",".join(parse_eot(self.eot))
        if self.ira_blocks is not None:
            self.ira_blocks = tuple(self.ira_blocks)
        if self.ira_vae_layers is not None:
            self.ira_vae_layers = tuple(self.ira_vae_layers)
        if self.model_weights is not None:
            self.model_weights = tuple(float(w) for w in self.model_weights)
            if any(w < 0 for w in self.model_weights) or not any(self.model_weights):
                raise ConfigError(f"model weights must be >= 0 and not all 0 (got {self.model_weights})")

    @classmethod
    def from_preset(
        cls,
        preset: str = DEFAULT_PRESET,
        families: Sequence[str] = (),
        long_video: bool = False,
        **overrides: Any,
    ) -> ProtectConfig:
        """A config from a named preset and method, with explicit values taking precedence.

        The method's own settings (e.g. the space of an ablation) sit between the
        preset and the explicit values; after them come the settings the method measured
        better on the model family, when every model targeted (``families``) is of one
        family that the method tunes (see `anti_i2v.methods.Method.family_overrides`).
        With ``long_video`` (every model targeted has a long video: `is_long_video`), the
        preset takes its route in `LONG_VIDEO_PRESETS` for the methods measured on it.
        """
        from anti_i2v.methods import get_method

        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        explicit = {k: v for k, v in overrides.items() if v is not None}
        method = get_method(explicit.get("method", "anti-i2v"))
        values = dict(PRESETS[preset])
        if long_video and method.long_video_route:
            values.update(LONG_VIDEO_PRESETS.get(preset, {}))
        values.update(method.overrides)
        values.update(method.overrides_for(families))
        values.update(explicit)
        values = {k: v(values) if callable(v) else v for k, v in values.items()}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s) {sorted(unknown)}; see ProtectConfig for the list")
        return cls(**values)

    @classmethod
    def for_models(cls, preset: str, models: Sequence[VideoModel], **overrides: Any) -> ProtectConfig:
        """`from_preset` as the loaded ``models`` take it: their family's settings and, on long
        videos, the preset's long-video route."""
        return cls.from_preset(preset, families=[m.family for m in models], long_video=is_long_video(models),
                               **overrides)

    def frame_phases(self) -> list[tuple[float, range]]:
        """The runs of steps in order, each with the share of the frames it optimises on:
        ``frame_share`` for all but the last ``full_frame_steps`` steps, then every frame."""
        if self.frame_share >= 1:
            return [(1.0, range(self.steps))]
        split = self.steps - self.full_frame_steps
        phases = [(self.frame_share, range(split)), (1.0, range(split, self.steps))]
        return [(share, steps) for share, steps in phases if steps]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data record of every setting (for the JSON sidecar and checkpoints)."""
        record = dataclasses.asdict(self)
        record["eps_255"] = self.eps * 255
        return record
