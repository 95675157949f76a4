"""Every shipped config file states every key of its stage's config with its default."""

import pytest
import yaml

from superdml.config.load import config_to_dict
from superdml.config.schema import CropsConfig, LabelConfig, SegmentConfig, TrainConfig
from superdml.config.shipped import configs_dir

SHIPPED = {"segment.yaml": SegmentConfig, "crops.yaml": CropsConfig, "label.yaml": LabelConfig}
#: What a loss's training config may set apart from TrainConfig's defaults.
LOSS_KEYS = {"loss", "loss_params"}


def _read(path):
    return yaml.safe_load(path.read_text())


def test_every_shipped_config_file_is_checked():
    files = {p.relative_to(configs_dir()).as_posix() for p in configs_dir().rglob("*.yaml")}
    losses = {f for f in files if f.startswith("losses/")}
    assert files - losses == set(SHIPPED) and losses


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_stage_config_file_equals_its_defaults(name):
    assert _read(configs_dir() / name) == config_to_dict(SHIPPED[name]())


@pytest.mark.parametrize("path", sorted(configs_dir().glob("losses/*.yaml")), ids=lambda p: p.stem)
def test_a_loss_config_file_equals_the_defaults_but_its_loss(path):
    shipped = _read(path)
    defaults = config_to_dict(TrainConfig())
    assert shipped["loss"] == path.stem and set(shipped) == set(defaults)
    assert {k: v for k, v in shipped.items() if k not in LOSS_KEYS} == {
        k: v for k, v in defaults.items() if k not in LOSS_KEYS
    }
