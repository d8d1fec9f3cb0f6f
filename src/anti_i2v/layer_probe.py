"""`anti-i2v layers`: which denoiser blocks carry the photo's semantics?

The paper chose IRC's layers from a PCA look at per-block features: semantics appear
only in deep blocks, while an early block carries almost none. This probe measures it
for any backbone: it runs the denoiser on the photo at a few timesteps, compares every
block's contribution with the deepest block's and its features with block 0's (linear
CKA on frame 0, pooled to a common grid), draws the first three PCA components of each block, and
suggests IRC's shallow and deep blocks and IRA's blocks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from anti_i2v.errors import ModelError
from anti_i2v.models.base import VideoModel
from anti_i2v.objectives.base import draw_step

POOL = 8  # every block is compared on an 8x8 grid of frame 0


def frame_maps(feature: torch.Tensor, model: VideoModel) -> torch.Tensor | None:
    """Frame 0 of a block output as a (C, h, w) map, or None when its token layout is unknown.

    U-Net blocks give (N, C, h, w) maps (frame 0 first). Transformer blocks give
    (B, tokens, C), frames outermost: the token grid is the model's `token_grid`, or
    else inferred from its resolution at a VAE factor of 8 and patch sizes 1 and 2.
    """
    if feature.dim() == 4:
        return feature[0].float()
    if feature.dim() != 3:
        return None
    tokens, channels = feature.shape[1], feature.shape[2]
    height, width = model.resolution
    known = model.token_grid()
    grids = [known] if known is not None else [
        (height // stride, width // stride) for stride in (8, 16)  # VAE factor x patch size 1 or 2
    ]
    for gh, gw in grids:
        if gh and gw and tokens % (gh * gw) == 0:
            return feature[0, : gh * gw].float().T.reshape(channels, gh, gw)
    return None


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA between (n, c1) and (n, c2) feature matrices, in [0, 1]; 1 = same structure."""
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    cross = (a.T @ b).pow(2).sum()
    norm = (a.T @ a).pow(2).sum().sqrt() * (b.T @ b).pow(2).sum().sqrt()
    return float(cross / norm.clamp_min(1e-12))


def pca_rgb(feature_map: torch.Tensor) -> np.ndarray:
    """The first three principal components of a (C, h, w) map as an (h, w, 3) uint8 image."""
    c, h, w = feature_map.shape
    x = feature_map.reshape(c, h * w).T
    x = x - x.mean(0, keepdim=True)
    k = min(3, x.shape[0], x.shape[1])
    _, _, v = torch.pca_lowrank(x, q=k, center=False)
    comps = x @ v[:, :k]
    comps = (comps - comps.min(0).values) / (comps.max(0).values - comps.min(0).values).clamp_min(1e-8)
    if k < 3:
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], 3 - k)], dim=1)
    return (comps.reshape(h, w, 3).numpy() * 255).round().astype(np.uint8)


@dataclass
class LayerReport:
    """Per block: similarity to the deepest block and to block 0, and the suggestions."""

    blocks: list[str]
    to_deepest: list[float]
    to_first: list[float]
    semantic: list[float]  # to_deepest - to_first: high where semantics have appeared
    irc_shallow: int
    irc_deep: list[int]
    ira_blocks: list[int]

    def to_dict(self) -> dict:
        """Plain data for the JSON ranking."""
        record = asdict(self)
        record["ranking"] = sorted(range(len(self.blocks)), key=lambda i: -self.semantic[i])
        return record


def probe_layers(
    model: VideoModel, x: torch.Tensor, prompt: str, timesteps: tuple[int, ...] = (250, 500, 750), seed: int = 0
) -> tuple[LayerReport, dict[str, torch.Tensor]]:
    """Measure every denoiser block on photo ``x`` (1, 3, H, W) in [0, 1]; returns the report and
    frame-0 maps per block (averaged over the timesteps)."""
    model.condition(prompt)
    names = model.layers().denoiser
    video = model.encode_video(model.repeat_frames(x))
    generator = torch.Generator().manual_seed(seed)
    maps: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for t in timesteps:
            draw = draw_step(generator, video.shape, (t, t))
            feats = model.features(x, draw.t, draw.noise, names, video, generator)
            for name in names:
                fmap = frame_maps(feats[name], model)
                if fmap is not None:
                    maps[name] = maps.get(name, 0) + fmap.cpu() / len(timesteps)
    kept = [n for n in names if n in maps]
    if not kept:
        raise ModelError(f"cannot lay out {model.name}'s block outputs as frames; its adapter should give token_grid()")
    pooled = {n: F.adaptive_avg_pool2d(maps[n][None], POOL)[0].reshape(maps[n].shape[0], -1).T for n in kept}
    first = pooled[kept[0]]

    def contribution(name: str) -> torch.Tensor:
        # what the block adds beyond block 0 (transformer blocks share one residual stream,
        # which would make every block look alike); U-Net blocks of another width as they are
        return pooled[name] - first if pooled[name].shape == first.shape else pooled[name]

    deepest = contribution(kept[-1])
    to_deepest = [linear_cka(contribution(n), deepest) for n in kept]
    to_first = [linear_cka(pooled[n], first) for n in kept]
    semantic = [d - f for d, f in zip(to_deepest, to_first)]
    index = {n: names.index(n) for n in kept}
    half = len(kept) // 2
    early = kept[1 : max(2, half)] or kept[:1]
    shallow = min(early, key=lambda n: to_deepest[kept.index(n)])
    after = kept[kept.index(shallow) + 1 :]
    late = sorted(after, key=lambda n: -semantic[kept.index(n)])[:3]  # the most semantic blocks after it
    report = LayerReport(
        blocks=kept,
        to_deepest=to_deepest,
        to_first=to_first,
        semantic=semantic,
        irc_shallow=index[shallow],
        irc_deep=sorted(index[n] for n in late),
        ira_blocks=sorted(index[n] for n in late),
    )
    return report, {n: maps[n] for n in kept}


def pca_figure(maps: dict[str, torch.Tensor], tile: int = 96, columns: int = 6) -> Image.Image:
    """The paper's figure: the first three PCA components of every block, labelled, in a grid."""
    names = list(maps)
    rows = math.ceil(len(names) / columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, name in enumerate(names):
        image = Image.fromarray(pca_rgb(maps[name])).resize((tile, tile), Image.NEAREST)
        x, y = (i % columns) * tile, (i // columns) * (tile + 14)
        sheet.paste(image, (x, y + 14))
        draw.text((x + 2, y + 1), name.split(".")[-1], fill=(0, 0, 0), font=ImageFont.load_default())
    return sheet


def write_layer_report(report: LayerReport, maps: dict[str, torch.Tensor], out_dir: Path) -> tuple[Path, Path]:
    """Write ``layers.json`` (ranking and suggestions) and ``layers_pca.png``; returns both paths."""
    from anti_i2v.atomic import write_atomic, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out_dir / "layers.json", report.to_dict())
    figure = pca_figure(maps)
    png_path = write_atomic(out_dir / "layers_pca.png", lambda tmp: figure.save(tmp, format="PNG"))
    return json_path, png_path
