"""The layer probe finds planted structure and its suggestions feed back into protect."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from anti_i2v.cli import app
from anti_i2v.layer_probe import linear_cka, probe_layers, write_layer_report
from anti_i2v.models.cogvideox import CogVideoXI2V
from anti_i2v.models.registry import MODELS, load_model

PROMPT = "a person talking to the camera"


def test_cka_is_one_for_the_same_structure_and_lower_for_noise():
    a = torch.randn(64, 8)
    assert abs(linear_cka(a, a @ torch.randn(8, 16)) - 1) < 0.2 or linear_cka(a, a) > 0.999
    assert linear_cka(a, 3 * a) > 0.999 and linear_cka(a, torch.randn(64, 8)) < 0.5


def test_blocks_that_copy_block_zero_are_reported_as_not_semantic(portrait, tmp_path):
    model = CogVideoXI2V.tiny(seed=0)
    blocks = model.transformer.transformer_blocks
    stored = {}
    hooks = [blocks[0].register_forward_hook(lambda m, i, o: stored.__setitem__("h", o[0]))]
    for k in (5, 6):  # planted: these deep blocks only copy block 0
        hooks.append(blocks[k].register_forward_hook(lambda m, i, o: (stored["h"], o[1])))
    x = model.prepare_image(portrait[0])
    try:
        report, maps = probe_layers(model, x, PROMPT)
    finally:
        for h in hooks:
            h.remove()
    assert report.to_first[5] > 0.999 and report.to_first[6] > 0.999
    ranking = report.to_dict()["ranking"]
    assert set(ranking[-3:]) >= {5, 6} or (ranking.index(5) > 3 and ranking.index(6) > 3)
    assert 5 not in report.irc_deep and 6 not in report.irc_deep
    json_path, png_path = write_layer_report(report, maps, tmp_path)
    assert json.loads(json_path.read_text())["irc_shallow"] == report.irc_shallow and png_path.stat().st_size > 0


def test_layers_command_prints_suggestions_protect_accepts(tmp_path):
    from anti_i2v.api import sample_photo

    runner = CliRunner()
    result = runner.invoke(app, ["layers", str(sample_photo()), "--model", "tiny-dynamicrafter", "--out",
                                 str(tmp_path / "layers")])
    assert result.exit_code == 0, result.output
    suggestion = next(line for line in result.output.splitlines() if line.startswith("suggested:"))
    args = suggestion.removeprefix("suggested:").split()
    again = runner.invoke(app, ["protect", "--sample", "--model", "tiny-dynamicrafter", "--steps", "1",
                                "--out", str(tmp_path / "out"), *args])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "layers" / "layers_pca.png").is_file()


@pytest.mark.parametrize("name", sorted(n for n, spec in MODELS.items() if spec.is_tiny))
def test_the_probe_reads_every_block_of_every_backbone(name, portrait):
    model = load_model(name, device="cpu")
    report, maps = probe_layers(model, model.prepare_image(portrait[0]), PROMPT, timesteps=(500,))
    assert report.blocks == model.layers().denoiser
    assert all(m.dim() == 3 and m.shape[1] >= 1 for m in maps.values())
