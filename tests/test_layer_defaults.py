"""IRC/IRA layer defaults follow the model's depth; explicit block indices are honoured and checked."""

from __future__ import annotations

import pytest
import torch

import anti_i2v
from anti_i2v.config import ProtectConfig
from anti_i2v.errors import ConfigError
from anti_i2v.objectives.anti_i2v import AntiI2VObjective
from anti_i2v.objectives.irc import default_irc_blocks


@pytest.mark.parametrize(
    ("depth", "shallow", "deep"),
    [(42, 3, (39, 40, 41)), (28, 3, (25, 26, 27)), (12, 3, (9, 10, 11)), (7, 3, (4, 5, 6)), (5, 1, (2, 3, 4)),
     (4, 0, (1, 2, 3)), (3, 0, (1, 2)), (2, 0, (1,))],
)
def test_default_blocks_keep_the_papers_choice_where_the_model_is_deep_enough(depth, shallow, deep):
    assert default_irc_blocks(depth) == (shallow, deep)
    assert shallow not in deep and max(deep) == depth - 1


def test_a_one_block_model_has_no_irc():
    with pytest.raises(ValueError, match="at least two"):
        default_irc_blocks(1)


@pytest.fixture(scope="module")
def three_block_wan(tmp_path_factory):
    """A Wan 2.1 I2V folder whose transformer has three blocks, loaded as a user would."""
    from diffusers import WanTransformer3DModel

    from anti_i2v.models.wan import WanI2V, tiny_pipeline

    pipe = tiny_pipeline(seed=3)
    config = dict(pipe.transformer.config)
    config["num_layers"] = 3
    torch.manual_seed(0)
    pipe.transformer = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    folder = tmp_path_factory.mktemp("wan3") / "weights"
    pipe.save_pretrained(folder)
    return WanI2V.from_pretrained(folder, device="cpu", dtype=torch.float32, resolution=(64, 64), num_frames=9,
                                  max_sequence_length=16)


def test_protect_runs_on_a_model_shallower_than_the_papers_block_indices(three_block_wan, portrait):
    assert len(three_block_wan.layers().denoiser) == 3
    result = anti_i2v.protect(portrait[0], three_block_wan, method="anti-i2v-paper", steps=2)
    assert result.budget.within_budget
    objective = AntiI2VObjective(three_block_wan, ProtectConfig(method="anti-i2v-paper"))
    assert objective.shallow == "denoiser.0" and objective.deep == ["denoiser.1", "denoiser.2"]


def test_explicit_blocks_are_honoured_and_checked(three_block_wan, portrait):
    objective = AntiI2VObjective(three_block_wan, ProtectConfig(irc_shallow=1, irc_deep=(-1,)))
    assert objective.shallow == "denoiser.1" and objective.deep == objective.ira_blocks == ["denoiser.2"]
    with pytest.raises(ConfigError, match="block index 3 is out of range"):
        anti_i2v.protect(portrait[0], three_block_wan, method="anti-i2v-paper", steps=1, irc_shallow=3)
