"""The `anti-i2v` command line: `protect`, `verify`, `evaluate`, `layers`, `serve` and `models`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from anti_i2v.config import (
    DEFAULT_PRESET,
    MEMORY_MODES,
    PRESETS,
    describe_preset,
    describe_steps,
    format_eps,
    parse_eps,
)
from anti_i2v.errors import AntiI2VError, ConfigError, ModelError, OutOfMemory

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Protect photos of people from image-to-video diffusion models (Anti-I2V).",
)
console = Console(soft_wrap=True)  # keep paths whole, never wrapped mid-name
err_console = Console(stderr=True, soft_wrap=True)

_MEMORY_HELP = "Memory mode: " + "; ".join(f"{name}: {text}" for name, text in MEMORY_MODES.items()) + "."
# options shared by the commands that load a model
_Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N.")]
_Dtype = Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32.")]
_Memory = Annotated[str, typer.Option(help=_MEMORY_HELP)]
_Verbose = Annotated[bool, typer.Option("--verbose", "-v")]
_PRESET_HELP = "; ".join(describe_preset(name) for name in PRESETS)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _fail(err: AntiI2VError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=err.exit_code)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise ConfigError(f"{option} takes comma-separated block indices such as -3,-2,-1 (got '{text}')") from err


def _float_list(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as err:
        raise ConfigError(f"{option} takes comma-separated numbers such as 2,1 (got '{text}')") from err


def _weights(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in {"irc", "ira", "dm", "aux", "div", "latent"} or not value:
            raise ConfigError(
                f"--weights takes irc=, ira=, dm=, aux=, div=, latent= entries such as irc=1,dm=0.5 (got '{item}')"
            )
        try:
            weights[f"weight_{name.strip()}"] = float(value)
        except ValueError as err:
            raise ConfigError(f"weight '{item}' is not a number") from err
    return weights


def _budget_line(budget) -> str:
    mark = "[green]within[/]" if budget.within_budget else "[red]OVER[/]"
    reading = f" + {budget.source_error * 255:.2f}/255 reading the source" if budget.source_error else ""
    return (
        f"L-inf {budget.linf_255:.2f}/255 ({budget.linf:.4f}){reading} {mark} eps {format_eps(budget.eps)}, "
        f"PSNR {budget.psnr:.2f} dB, SSIM {budget.ssim:.4f}"
    )


@app.command()
def protect(
    photos: Annotated[Optional[list[Path]], typer.Argument(help="Photos or folders of photos.", show_default=False)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Model(s) to protect against, comma-separated for one perturbation against several (`anti-i2v models`).")] = "cogvideox",
    model_path: Annotated[Optional[Path], typer.Option(help="Local folder of the model's weights.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("protected"),
    preset: Annotated[str, typer.Option(help=f"Strength preset ({_PRESET_HELP}).")] = DEFAULT_PRESET,
    eps: Annotated[Optional[str], typer.Option(help="L-inf budget in [0,1] pixel units, e.g. 8/255 (default 8/255).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimisation steps (overrides the preset).")] = None,
    method: Annotated[str, typer.Option(help="anti-i2v (default), anti-i2v-paper (the published method) and its ablations (anti-i2v-paper-rgb, -lab, -dct, -irc, -ira), or a baseline (advdm, mist, photoguard, sds, clip-embed, random).")] = "anti-i2v",
    space: Annotated[Optional[str], typer.Option(help="Perturbation space: dual | lab | dct | rgb (default: the method's: rgb for anti-i2v, dual for anti-i2v-paper).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text prompt the attacker is assumed to use.")] = None,
    target: Annotated[Optional[Path], typer.Option(help="IRA target image (default: a generated pattern).")] = None,
    reference: Annotated[Optional[str], typer.Option(help="Reference video of the diffusion loss: repeat | generate | FILE (default: the method's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random draw: same photo, config and seed give the same file with the same software, device and thread count (the sidecar records them).")] = 0,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: GPU if present).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU and for tiny models).")] = None,
    memory: _Memory = "full",
    compile_denoiser: Annotated[bool, typer.Option("--compile", help="Compile the denoiser's blocks (torch.compile): same numbers; the first step compiles.")] = False,
    attention: Annotated[str, typer.Option(help="Attention kernel: auto (PyTorch's fastest for the inputs), flash, efficient, cudnn or math.")] = "auto",
    fmt: Annotated[str, typer.Option("--format", help="png (lossless, default), or jpg / webp (lossy: weakens protection).")] = "png",
    step_size: Annotated[Optional[float], typer.Option(help="RGB step in [0,1] units (default: the method's; the default method's is 5*eps/steps, at most eps and at least 1/255).")] = None,
    dct_band: Annotated[Optional[float], typer.Option(help="Share of the lowest DCT frequencies per axis that may change (default 0.25).")] = None,
    dct_block: Annotated[Optional[int], typer.Option(help="DCT tile size; 0 for one global DCT (default 8).")] = None,
    dual_period: Annotated[Optional[int], typer.Option(help="Steps per stage before the dual space switches Lab <-> DCT (default 1).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Loss weights, e.g. irc=1,ira=1,dm=1,aux=0,div=0,latent=0 (default: the method's; aux on only if its CLIP weights are local).")] = None,
    t_min: Annotated[Optional[int], typer.Option(help="Smallest diffusion timestep sampled (default 0).")] = None,
    t_max: Annotated[Optional[int], typer.Option(help="Largest diffusion timestep sampled (default 999).")] = None,
    momentum: Annotated[Optional[float], typer.Option(help="Momentum decay of the sign steps, 0 for plain sign-PGD (default: the method's).")] = None,
    eot: Annotated[Optional[str], typer.Option(help="Random transforms optimised through, e.g. jpeg,resize,blur,noise, or none (default: the method's).")] = None,
    min_psnr: Annotated[Optional[float], typer.Option(help="Visibility floor: the saved PNG's PSNR to the original is at least this many dB (the perturbation is scaled down as little as needed; JPEG or WebP add their own error); 0 for none (default: the method's).")] = None,
    irc_shallow: Annotated[Optional[int], typer.Option(help="IRC anchor block (default: the paper's block 3, earlier on shallow models).")] = None,
    irc_deep: Annotated[Optional[str], typer.Option(help="IRC deep blocks, negative from the end (default: the last three).")] = None,
    ira_blocks: Annotated[Optional[str], typer.Option(help="IRA denoiser blocks (default: the IRC deep blocks).")] = None,
    aux_model: Annotated[Optional[str], typer.Option(help="Hub id or folder of the CLIP vision model of the auxiliary term.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Save optimisation state every N steps, to resume after a crash.")] = 0,
    early_stop: Annotated[Optional[int], typer.Option(help="Stop once the loss has stopped improving over this many steps; 0 runs every step (default: the preset's).")] = None,
    sampler_steps: Annotated[Optional[int], typer.Option(help="Steps of the guided sampler the default method differentiates through (default 4; 2 halves the cost of a step).")] = None,
    sampler_noise_pool: Annotated[Optional[int], typer.Option(help="Draw this many sampler noises once and run the clean photo's sampler from each once, when a step first picks it, instead of fresh noise and a clean run every step (a fifth to a third faster per step); 0 for fresh noise every step (default: the method's, 2 for anti-i2v).")] = None,
    sampler_guided_steps: Annotated[Optional[int], typer.Option(help="Guide only the first K steps of that sampler (negative: the last -K), 0 every step (default: the method's, 2 for anti-i2v, every step on SVD; each unguided step saves a denoiser pass).")] = None,
    frame_share: Annotated[Optional[float], typer.Option(help="Optimise on about this share of the model's frames, e.g. 0.5 (faster; the attacker's videos keep every frame); default 1, or 0.25 with the fast and balanced presets on long videos (CogVideoX-5B).")] = None,
    frame_spread: Annotated[Optional[bool], typer.Option("--frame-spread/--first-frames", help="With --frame-share: optimise on frames spread over the whole video, each at its own position, or on the first ones (default: spread where the model keeps the positions, CogVideoX; the first frames elsewhere).")] = None,
    full_frame_steps: Annotated[Optional[int], typer.Option(help="With --frame-share below 1: run the last N of the steps on every frame, from where the others left off (default 0, or 1 with the balanced preset on long videos).")] = None,
    model_weights: Annotated[Optional[str], typer.Option(help="With several --model: each one's weight in the sum, e.g. 2,1 (default: all 1).")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray", help="Run the batch on Ray: local (start an instance here), auto (join this machine's cluster) or a cluster address; one worker per GPU, or per CPU slot.")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(help="With --ray: at most this many workers (default: one per GPU or CPU slot).")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Protect the bundled sample portrait.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo photos already protected in --out.")] = False,
    verbose: _Verbose = False,
) -> None:
    """Protect photos: each is saved as <stem>_protected.png with a JSON sidecar of its figures."""
    _setup_logging(verbose)
    from anti_i2v.api import sample_photo
    from anti_i2v.batch import RunSummary, check_output_dir, protect_batch
    from anti_i2v.config import ProtectConfig
    from anti_i2v.offload import park_for_next_load
    from anti_i2v.photo import load_photo, output_path_for
    from anti_i2v.spaces import space_from_config

    sources: list[Path] = list(photos or [])
    if sample:
        sources.append(sample_photo())
    if not sources:
        raise _fail(AntiI2VError("no photo given: pass PHOTO or FOLDER paths, or --sample"))
    try:
        options = dict(
            preset=preset,
            method=method,
            eps=parse_eps(eps) if eps is not None else None,
            steps=steps,
            space=space,
            prompt=prompt,
            target=str(target) if target else None,
            reference=reference,
            seed=seed,
            checkpoint_every=checkpoint_every,
            early_stop=early_stop,
            frame_share=frame_share,
            frame_spread=frame_spread,
            full_frame_steps=full_frame_steps,
            sampler_steps=sampler_steps,
            sampler_noise_pool=sampler_noise_pool,
            sampler_guided_steps=sampler_guided_steps,
            step_size=step_size,
            dct_band=dct_band,
            dct_block=dct_block,
            dual_period=dual_period,
            t_min=t_min,
            t_max=t_max,
            momentum=momentum,
            eot=eot,
            min_psnr=min_psnr,
            irc_shallow=irc_shallow,
            irc_deep=_int_list(irc_deep, "--irc-deep") if irc_deep else None,
            ira_blocks=_int_list(ira_blocks, "--ira-blocks") if ira_blocks else None,
            aux_model=aux_model,
            model_weights=_float_list(model_weights, "--model-weights") if model_weights else None,
            **_weights(weights),
        )
        cfg = ProtectConfig.from_preset(preset, **{k: v for k, v in options.items() if k != "preset"})
        space_from_config(cfg)
        if target is not None:
            load_photo(target)
        output_path_for(None, out, fmt)  # checks the format
        check_output_dir(out)  # before a model load that can take minutes
    except AntiI2VError as err:
        raise _fail(err) from None
    if ray_address is not None:
        _protect_on_ray(sources, model, out, ray_address, ray_workers, model_path, device, dtype, memory,
                        compile_denoiser, attention, fmt, overwrite, options)
        return
    names = [m.strip() for m in model.split(",") if m.strip()]
    if model_path is not None and len(names) > 1:
        raise _fail(ConfigError("--model-path serves one model; load the others from the hub cache"))
    if cfg.model_weights is not None and len(cfg.model_weights) != len(names):
        raise _fail(ConfigError(f"--model-weights gives {len(cfg.model_weights)} weights for {len(names)} models"))
    video_models = []
    for index, name in enumerate(names):
        video_models.append(_load_for_cli(name, model_path, device, dtype, memory, compile_denoiser, attention))
        if index < len(names) - 1:
            park_for_next_load(video_models[-1])  # ensemble members take turns on the GPU
    # the preset as these models take it (on long videos: more steps on fewer frames)
    cfg = ProtectConfig.for_models(preset, video_models, **{k: v for k, v in options.items() if k != "preset"})
    shapes = ", ".join(
        f"{m.name} {m.size_summary()}" for m in video_models
    )
    console.print(
        f"protecting {len(sources)} input(s) against [bold]{model}[/] ({shapes}, {video_models[0].device}); "
        f"eps {format_eps(cfg.eps)}, {describe_steps(cfg.to_dict())}, space {cfg.space}"
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task_ids: dict[str, int] = {}

    def on_start(index: int, total: int, source: Path) -> None:
        task_ids["current"] = progress.add_task(f"[{index + 1}/{total}] {source.name}", total=cfg.steps, loss="-")

    def on_step(report) -> None:
        progress.update(
            task_ids["current"], completed=report.step, loss=f"{report.parts.get('total', float('nan')):+.4f}"
        )

    def on_done(item) -> None:
        task = task_ids.get("current")
        if task is not None:
            progress.remove_task(task)
        _print_item(progress.console, item)

    began = time.perf_counter()
    try:
        with progress:
            items = protect_batch(
                sources,
                video_models,
                out,
                fmt=fmt,
                overwrite=overwrite,
                on_start=on_start,
                on_done=on_done,
                callback=on_step,
                **options,
            )
    except AntiI2VError as err:
        raise _fail(err) from None
    summary = RunSummary.of(items, time.perf_counter() - began)
    console.print(f"{summary.line()}; outputs in {out}")
    if summary.failed:
        raise typer.Exit(code=1)


def _print_item(output: Console, item) -> None:
    """One line for a photo of a batch as it ends: saved (with its budget when known), skipped or failed."""
    if item.status == "done":
        budget = f": {_budget_line(item.result.budget)}" if item.result is not None else ""
        output.print(f"[green]saved[/] {escape(str(item.output))}{budget}", highlight=False)
    elif item.status == "skipped":
        output.print(f"[dim]skipped[/] {escape(str(item.source))}: already protected as {escape(str(item.output))}",
                     highlight=False)
    else:
        output.print(f"[red]failed[/] {escape(str(item.source))}: {escape(str(item.error))}", highlight=False)


def _protect_on_ray(sources: list[Path], model: str, out: Path, address: str, workers: int | None,
                    model_path: Path | None, device: str | None, dtype: str | None, memory: str,
                    compile_denoiser: bool, attention: str, fmt: str, overwrite: bool, options: dict) -> None:
    """`protect --ray`: the batch on Ray workers, a line per photo as it ends, and the run's summary."""
    _require_extra("ray", "--ray")
    from anti_i2v.ray_batch import protect_batch_on_ray

    console.print(f"protecting {len(sources)} input(s) against [bold]{model}[/] on Ray ({address})")
    try:
        items, summary = protect_batch_on_ray(
            sources, model, out, address=address, workers=workers, model_path=model_path, device=device,
            dtype=dtype, memory=memory, compile=compile_denoiser, attention=attention, fmt=fmt,
            overwrite=overwrite, on_done=lambda item: _print_item(console, item), **options,
        )
    except AntiI2VError as err:
        raise _fail(err) from None
    console.print(f"{summary.line()}; outputs in {out}")
    if summary.failed:
        raise typer.Exit(code=1)


def _require_extra(extra: str, what: str) -> None:
    """End with one line when the modules of an optional extra (``eval``, ``ray``, ``web``) are missing."""
    from anti_i2v.extras import require_extra

    try:
        require_extra(extra, what)
    except AntiI2VError as err:
        raise _fail(err) from None


def _purifier_names(text: str, diffpure_model: str | None) -> list[str]:
    """``default``, ``none`` or a comma list -> checked purification names."""
    from anti_i2v.evaluation.purify import DEFAULT_BATTERY, PURIFIER_NAMES, diffpure_available, is_purifier_name

    names = {"default": list(DEFAULT_BATTERY), "none": []}.get(text)
    if names is None:
        names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(n for n in set(names) if not is_purifier_name(n))
    if unknown:
        raise ConfigError(f"unknown purification(s) {', '.join(unknown)}; choose from {', '.join(PURIFIER_NAMES)} "
                          "(or long<N>, social<N> for a long edge of N pixels)")
    if "diffpure" in names and not diffpure_available(diffpure_model):
        raise ModelError("diffpure needs an image diffusion model's weights locally (--diffpure-model DIR)")
    return names


def _load_for_cli(
    model: str,
    model_path: Path | None,
    device: str | None,
    dtype: str | None,
    memory: str = "full",
    compile_denoiser: bool = False,
    attention: str = "auto",
):
    """Load a model for a command, or end with one line saying why not."""
    import torch

    from anti_i2v.memory import check_memory_mode, lighter_mode
    from anti_i2v.models.registry import DEMONSTRATION_NOTE, get_spec, load_model, weights_present

    try:
        spec = get_spec(model)
        if spec.is_tiny:
            console.print(f"[yellow]{model}[/] has {DEMONSTRATION_NOTE}.")
        elif model_path is None and not weights_present(spec) and os.environ.get("HF_HUB_OFFLINE"):
            raise ModelError(
                f"no weights for '{model}' in the local cache and the hub is offline; "
                f"download {spec.hub_id} and pass --model-path DIR"
            )
        check_memory_mode(memory)
        with console.status(f"loading {model}"):
            return load_model(model, model_path, device, dtype, memory, compile_denoiser, attention)
    except AntiI2VError as err:
        raise _fail(err) from None
    except torch.OutOfMemoryError:
        lighter = lighter_mode(memory)
        hint = f"try --memory {lighter} ({MEMORY_MODES[lighter]})" if lighter else "use a GPU with more memory"
        raise _fail(OutOfMemory(f"'{model}' does not fit in this GPU's memory in --memory {memory}; {hint}")) from None


@app.command()
def verify(
    original: Annotated[Path, typer.Argument(help="The original photo.")],
    protected: Annotated[Path, typer.Argument(help="Its protected copy.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model(s) to generate with, comma-separated: one report each (`anti-i2v models`).")] = "cogvideox",
    model_path: Annotated[Optional[Path], typer.Option(help="Local folder of the model's weights.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt of the generations (default: the protection's default).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed, the same for every video.")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps.", min=1)] = 50,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the model's).")] = None,
    purify: Annotated[str, typer.Option(help="Purifications to test, comma-separated, 'default' or 'none'.")] = "default",
    dino_model: Annotated[Optional[str], typer.Option(help="DINO model for the DINO score (hub id or folder).")] = None,
    diffpure_model: Annotated[Optional[str], typer.Option(help="Image diffusion model of the diffpure purification.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("report"),
    device: _Device = None,
    dtype: _Dtype = None,
    memory: _Memory = "full",
    verbose: _Verbose = False,
) -> None:
    """Generate videos from the original, the protected photo and purified copies; report whether protection holds."""
    _setup_logging(verbose)
    _require_extra("eval", "this command")
    from anti_i2v.config import DEFAULT_PROMPT
    from anti_i2v.evaluation.generate import GenerationSettings
    from anti_i2v.evaluation.metrics.dino import DEFAULT_DINO
    from anti_i2v.evaluation.scoring import VideoScorer
    from anti_i2v.evaluation.verify import RANDOM_WEIGHTS_NOTE
    from anti_i2v.evaluation.verify import verify as run_verify
    from anti_i2v.evaluation.verify import write_models_summary
    from anti_i2v.photo import load_photo

    try:
        names = _purifier_names(purify, diffpure_model)
        load_photo(original), load_photo(protected)
    except AntiI2VError as err:
        raise _fail(err) from None
    model_names = [m.strip() for m in model.split(",") if m.strip()]
    if model_path is not None and len(model_names) > 1:
        raise _fail(ConfigError("--model-path serves one model; load the others from the hub cache"))
    settings = GenerationSettings(prompt=prompt or DEFAULT_PROMPT, seed=seed, steps=steps, guidance_scale=guidance)
    reports: dict[str, dict] = {}
    for model_name in model_names:
        video_model = _load_for_cli(model_name, model_path, device, dtype, memory)
        # one report per model; with several models, each in its own sub-folder
        folder = out if len(model_names) == 1 else out / model_name
        total = 3 + len(names)  # original, protected, same-budget noise, then each purification
        with console.status("generating") as status:
            done = []

            def on_video(name: str) -> None:
                done.append(name)
                status.update(f"{model_name}: generating video {len(done)}/{total}: {name}")

            try:
                report = run_verify(
                    original, protected, video_model, folder, settings, names,
                    scorer=VideoScorer(dino=dino_model or DEFAULT_DINO, device=video_model.device),
                    on_video=on_video,
                    diffpure_model=diffpure_model,
                    note=RANDOM_WEIGHTS_NOTE if video_model.source == "built in code" else None,
                )
            except AntiI2VError as err:
                raise _fail(err) from None
        _print_verdicts(report, f"{protected.name} against {model_name}", folder)
        reports[model_name] = report
        del video_model
    if len(model_names) > 1:
        console.print(f"one row per model: {write_models_summary(reports, out)}")


def _print_verdicts(report: dict, title: str, folder: Path) -> None:
    """The verdict table of one `verify` report, skipped metrics and where the report is."""
    from anti_i2v.evaluation.verify import TABLE_METRICS

    metrics = [m for m in TABLE_METRICS if any(m in r["scores"] for r in report["runs"].values())]
    table = Table(title=title)
    table.add_column("video", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    headers = {"warp_error": "warp", "psnr_to_clean_video": "PSNR→clean", "qalign_video": "Q-Align"}
    for m in metrics:
        table.add_column(headers.get(m, m), justify="right", no_wrap=True)
    colours = {"protected": "green", "weak": "dark_orange", "not protected": "red", "frozen": "yellow"}
    for name, run in report["runs"].items():
        colour = colours.get(run["verdict"], "white")
        cells = [f"{run['scores'][m]:.3g}" if m in run["scores"] else "-" for m in metrics]
        table.add_row(name, f"[{colour}]{run['verdict']}[/]", *cells)
    console.print(table)
    for name, why in report["skipped_metrics"].items():
        console.print(f"[dim]{name} not computed: {why}[/]")
    console.print(f"worst case: {report['worst_case']}; report in {folder}/report.md")
    if report.get("note"):
        console.print(f"[yellow]{report['note']}[/]")


@app.command()
def evaluate(
    dataset: Annotated[Path, typer.Argument(help="Folder of photos.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model(s) to protect against and generate with, comma-separated.")] = "cogvideox",
    protect_with: Annotated[Optional[str], typer.Option(help="Also protect against these models (a+b: one ensemble) and generate with every --model: the transfer table (cross_model.md).")] = None,
    methods: Annotated[str, typer.Option(help="Methods, comma-separated (anti-i2v, ablations, advdm, mist, photoguard, sds, clip-embed, random).")] = "anti-i2v,advdm,mist,photoguard,sds,random",
    prompts: Annotated[Optional[Path], typer.Option(help="CSV (image,prompt) or JSON-lines prompts file.")] = None,
    eps: Annotated[str, typer.Option(help="L-inf budget in [0,1] pixel units, the same for every method.")] = "8/255",
    steps: Annotated[int, typer.Option(help="Optimisation steps, the same for every method.", min=1)] = 200,
    seed: Annotated[int, typer.Option(help="Seed of protection and generation.")] = 0,
    generation_steps: Annotated[int, typer.Option(help="Sampling steps of each generated video.", min=1)] = 50,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the model's).")] = None,
    purify: Annotated[str, typer.Option(help="Purifications applied after protection, comma-separated, or 'none'.")] = "none",
    model_path: Annotated[Optional[Path], typer.Option(help="Local folder of the weights (one model only).")] = None,
    dino_model: Annotated[Optional[str], typer.Option(help="DINO model for the DINO score (hub id or folder).")] = None,
    diffpure_model: Annotated[Optional[str], typer.Option(help="Image diffusion model of the diffpure purification.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable).")] = Path("evaluation"),
    device: _Device = None,
    dtype: _Dtype = None,
    memory: _Memory = "full",
    verbose: _Verbose = False,
) -> None:
    """Protect a data set with each method under one budget, generate, measure, and tabulate per model."""
    _setup_logging(verbose)
    _require_extra("eval", "this command")
    from anti_i2v.evaluation.evaluate import evaluate as run_evaluate
    from anti_i2v.evaluation.evaluate import read_dataset
    from anti_i2v.evaluation.metrics.dino import DEFAULT_DINO
    from anti_i2v.evaluation.scoring import VideoScorer
    from anti_i2v.methods import parse_methods

    try:
        budget = parse_eps(eps)
        chosen = parse_methods(methods)
        samples = read_dataset(dataset, prompts)
        purifiers = _purifier_names(purify, diffpure_model)
        names = [m.strip() for m in model.split(",") if m.strip()]
        if model_path is not None and len(names) > 1:
            raise ConfigError("--model-path serves one model; evaluate several models from the hub cache")
    except AntiI2VError as err:
        raise _fail(err) from None
    protectors = [p.strip() for p in (protect_with or "").split(",") if p.strip()]
    loaded: dict[str, object] = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = _load_for_cli(name, model_path, device, dtype, memory)
        return loaded[name]

    for name in names:
        video_model = get(name)
        for against in [name, *[p for p in protectors if p != name]]:
            console.print(f"evaluating {len(samples)} photo(s) x {len(chosen)} method(s): protected against "
                          f"[bold]{against}[/], generated with [bold]{name}[/]")
            with console.status("working") as status:
                try:
                    table = run_evaluate(
                        samples, video_model, chosen, out, eps=budget, steps=steps, seed=seed,
                        generation_steps=generation_steps, guidance_scale=guidance, purifiers=purifiers,
                        scorer=VideoScorer(dino=dino_model or DEFAULT_DINO, device=video_model.device),
                        on_item=lambda item: status.update(f"{name}: {item}"),
                        diffpure_model=diffpure_model,
                        protect_model=[get(member) for member in against.split("+")] if against != name else None,
                    )
                except AntiI2VError as err:
                    raise _fail(err) from None
            console.print(f"{len(table)} table rows (methods and purifications)")
        if video_model.source == "built in code":
            from anti_i2v.evaluation.verify import RANDOM_WEIGHTS_NOTE

            console.print(f"[yellow]{RANDOM_WEIGHTS_NOTE}[/]")
    if protectors:
        from anti_i2v.evaluation.evaluate import cross_model_table

        for method in chosen:
            cross_model_table(out, list(dict.fromkeys([*names, *protectors])), names, method.name)
        console.print(f"transfer table in {out / 'cross_model.md'}")


@app.command()
def layers(
    photo: Annotated[Path, typer.Argument(help="A photo of a person.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model to probe (`anti-i2v models`).")] = "cogvideox",
    model_path: Annotated[Optional[Path], typer.Option(help="Local folder of the model's weights.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text prompt of the denoiser passes.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for layers.json and layers_pca.png.")] = Path("layers"),
    device: _Device = None,
    dtype: _Dtype = None,
    memory: _Memory = "full",
) -> None:
    """Find the denoiser blocks that carry semantics; suggest IRC and IRA layers for `protect`."""
    _setup_logging(False)
    from anti_i2v.config import DEFAULT_PROMPT
    from anti_i2v.layer_probe import probe_layers, write_layer_report
    from anti_i2v.photo import load_photo

    try:
        rgb = load_photo(photo).rgb
    except AntiI2VError as err:
        raise _fail(err) from None
    video_model = _load_for_cli(model, model_path, device, dtype, memory)
    with console.status(f"probing {model}"), video_model.sized_for(*rgb.shape[-2:]):
        report, maps = probe_layers(video_model, video_model.prepare_image(rgb).to(video_model.device),
                                    prompt or DEFAULT_PROMPT)
    json_path, png_path = write_layer_report(report, maps, out)
    deep = ",".join(str(i) for i in report.irc_deep)
    console.print(f"most semantic blocks: {', '.join(report.blocks[i] for i in report.to_dict()['ranking'][:5])}")
    console.print(f"suggested: --irc-shallow {report.irc_shallow} --irc-deep {deep} --ira-blocks {deep}")
    console.print(f"wrote {json_path} and {png_path}")


@app.command("convert-checkpoint")
def convert_checkpoint(
    checkpoint: Annotated[str, typer.Argument(help="An official DynamiCrafter model.ckpt (file, folder or hub id).")],
    out: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    variant: Annotated[str, typer.Option(help="256, 512, 1024 or 512_interp.")] = "512",
) -> None:
    """Convert an official DynamiCrafter checkpoint to safetensors (same keys; loads without pickle)."""
    _setup_logging(False)
    from anti_i2v.models.dynamicrafter.checkpoint import convert_to_safetensors

    try:
        path = convert_to_safetensors(checkpoint, out, variant=variant)
    except AntiI2VError as err:
        raise _fail(err) from None
    console.print(f"wrote {path}; pass it with --model dynamicrafter-{variant.replace('_', '-')} --model-path {path}")


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model(s) the page offers, comma-separated (default: every model whose weights are here, else tiny-cogvideox as a demonstration).")] = None,
    model_path: Annotated[Optional[Path], typer.Option(help="Local folder of the (one) model's weights.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 7860,
    share: Annotated[bool, typer.Option("--share", help="Also open a public Gradio share link (off unless asked).")] = False,
    keep_minutes: Annotated[float, typer.Option(help="Delete each job's uploads and results after this many minutes.", min=1)] = 60.0,
    temp_dir: Annotated[Optional[Path], typer.Option(help="Where the temporary folder goes (default: the system's).")] = None,
    max_megapixels: Annotated[float, typer.Option(help="Largest photo accepted, in megapixels.", min=0.01)] = 50.0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest file accepted, in MB.", min=0.01)] = 50.0,
    check_steps: Annotated[int, typer.Option(help="Sampling steps of the check step's videos.", min=1)] = 50,
    device: _Device = None,
    dtype: _Dtype = None,
    memory: _Memory = "full",
    verbose: _Verbose = False,
) -> None:
    """Serve a web page that protects uploaded photos (needs the web extra: pip install 'anti-i2v\\[web]')."""
    _setup_logging(verbose)
    _require_extra("web", "`serve`")
    from anti_i2v.memory import check_memory_mode
    from anti_i2v.models.registry import MODELS, weights_present
    from anti_i2v.web.app import serve as run_page

    if model is not None:
        names = [m.strip() for m in model.split(",") if m.strip()]
    else:
        names = [s.name for s in MODELS.values() if not s.is_tiny and weights_present(s)] or ["tiny-cogvideox"]
    if all(MODELS[n].is_tiny for n in names if n in MODELS):
        console.print("[yellow]only models with random weights are served: the page demonstrates the pipeline "
                      "and protects against nothing.[/]")

    def ready(url: str, folder: Path) -> None:
        console.print(f"anti-i2v page at {url} (Ctrl-C stops it); uploads and results in {escape(str(folder))}, "
                      f"deleted after {keep_minutes:g} min and when the server stops", highlight=False)

    try:
        check_memory_mode(memory)
        if temp_dir is not None and not temp_dir.is_dir():
            raise ConfigError(f"--temp-dir '{temp_dir}' is not a folder; create it or choose another")
        run_page(names, host=host, port=port, share=share, keep_minutes=keep_minutes, temp_dir=temp_dir,
                 on_ready=ready, model_path=model_path, device=device, dtype=dtype, memory=memory,
                 max_megapixels=max_megapixels, max_upload_mb=max_upload_mb, check_steps=check_steps)
    except AntiI2VError as err:
        raise _fail(err) from None
    except OSError as err:  # e.g. the port is taken
        raise _fail(AntiI2VError(f"the page could not start on {host}:{port} ({err}); "
                                 "choose another --port or --host")) from None


@app.command()
def models() -> None:
    """List the models, their hub ids, and whether their weights are present locally."""
    from anti_i2v.models.registry import MODELS, weights_present

    for spec in MODELS.values():
        present = "built in code" if spec.is_tiny else ("weights here" if weights_present(spec) else "no weights here")
        console.print(f"[bold]{spec.name}[/]  {spec.hub_id or '-'}  ({present})", highlight=False)
        console.print(f"    {spec.description}", highlight=False, style="dim")


def main() -> None:
    """Entry point of the `anti-i2v` script."""
    app()


if __name__ == "__main__":
    main()
