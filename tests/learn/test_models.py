import urllib.error

import pytest
import torch
from torchvision import models as tvm

from superdml.config.schema import TrainConfig
from superdml.core.errors import ConfigError, InputError, MissingInputError
from superdml.learn.models import EmbeddingNet, build_model, model_spec


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("bands", [1, 3, 4])
def test_embeddings_are_unit_length_for_any_band_count(bands):
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18", embedding_size=32, in_channels=bands).eval()
    assert model.backbone.conv1.weight.shape == (64, bands, 7, 7)
    with torch.no_grad():
        out = model(torch.randn(5, bands, 64, 64))
    assert out.shape == (5, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("backbone", ["resnet34", "resnet50"])
def test_deeper_backbones(backbone):
    model = EmbeddingNet(backbone, embedding_size=16, in_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 32, 32))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_gradients_reach_the_first_convolution():
    model = EmbeddingNet("resnet18", embedding_size=8, in_channels=4)
    model(torch.randn(4, 4, 32, 32)).sum().backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="backbone: got 'vgg16'"):
        EmbeddingNet("vgg16")


def test_weights_path_loads_a_torchvision_state_dict(resnet18_file):
    reference = torch.load(resnet18_file, weights_only=True)
    model = EmbeddingNet("resnet18", 16, in_channels=3, weights_path=resnet18_file)
    assert torch.equal(model.backbone.conv1.weight, reference["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])
    assert torch.equal(model.backbone.bn1.running_var, reference["bn1.running_var"])


@pytest.mark.parametrize("bands", [1, 2, 4, 5])
def test_weights_path_adapts_the_first_convolution(resnet18_file, bands):
    rgb = torch.load(resnet18_file, weights_only=True)["conv1.weight"]
    mean = rgb.mean(dim=1)
    weight = EmbeddingNet("resnet18", 16, bands, weights_path=resnet18_file).backbone.conv1.weight
    assert weight.shape == (64, bands, 7, 7)
    if bands > 3:
        assert torch.equal(weight[:, :3], rgb)
        for extra in range(3, bands):
            torch.testing.assert_close(weight[:, extra], mean)
    else:
        # a gray image replicated into the bands gets the RGB response
        torch.testing.assert_close(weight.sum(dim=1), rgb.sum(dim=1))
        for band in range(bands):
            torch.testing.assert_close(weight[:, band], mean * 3 / bands)


def test_weights_path_errors_name_the_file(tmp_path, resnet18_file):
    with pytest.raises(MissingInputError, match=r"missing\.pth: no such file"):
        EmbeddingNet("resnet18", weights_path=tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(InputError, match=r"notes\.pth: not a torch state_dict file"):
        EmbeddingNet("resnet18", weights_path=text)
    with pytest.raises(InputError, match=r"resnet18\.pth: does not fit resnet50"):
        EmbeddingNet("resnet50", weights_path=resnet18_file)
    partial = tmp_path / "partial.pth"
    state = torch.load(resnet18_file, weights_only=True)
    del state["layer1.0.conv1.weight"]
    torch.save(state, partial)
    with pytest.raises(InputError, match=r"partial\.pth: not a torchvision resnet18.*layer1"):
        EmbeddingNet("resnet18", weights_path=partial)


def test_pretrained_weights_offline_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError) as caught:
        EmbeddingNet("resnet18", pretrained=True)
    message = str(caught.value)
    assert "\n" not in message
    assert "pretrained: false" in message
    assert "weights_path: FILE" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "TORCH_HOME" in message and "no network" in message


def test_build_model_and_spec_follow_the_config():
    config = TrainConfig(backbone="resnet34", embedding_size=24, input_size=48)
    model = build_model(config, in_channels=4)
    assert isinstance(model, EmbeddingNet)
    assert model.embedding.out_features == 24
    assert model_spec(model, config.input_size) == {
        "backbone": "resnet34",
        "embedding_size": 24,
        "in_channels": 4,
        "input_size": 48,
    }
