import hashlib
import random

import numpy as np
import pytest
import torch

from superdml.config.schema import TrainConfig, config_to_dict
from superdml.core.errors import CheckpointError, MissingInputError
from superdml.learn.checkpoint import (
    FORMAT,
    build_model_from_checkpoint,
    checkpoint_sha256,
    load_checkpoint,
    save_checkpoint,
)
from superdml.learn.models import EmbeddingNet
from superdml.learn.resume import resume_state
from superdml.learn.rng import capture_rng_state, restore_rng_state

CLASSES = ["brick", "grass", "gravel"]
MEAN, STD = [0.5, 0.4, 0.3, 0.5], [0.2, 0.2, 0.2, 0.5]
CROP_RULE = {"crop_size": 64, "mask": "alpha", "scaling": "percentile"}


class Proxies(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proxies = torch.nn.Parameter(torch.randn(3, 16))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model, loss and optimizer after one step, saved with resume state."""
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18", embedding_size=16, in_channels=4)
    loss = Proxies()
    params = list(model.parameters()) + list(loss.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    (model(torch.randn(6, 4, 32, 32)) @ loss.proxies.T).sum().backward()
    optimizer.step()
    scheduler.step()
    config = TrainConfig(embedding_size=16, input_size=32, loss_params={"margin": 0.1})
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    saved = save_checkpoint(
        path,
        model=model,
        input_size=32,
        class_names=CLASSES,
        normalization="dataset",
        mean=MEAN,
        std=STD,
        loss_name="proxy_anchor",
        loss_params={"margin": 0.1, "alpha": 32},
        loss_state=loss.state_dict(),
        train_config=config,
        metrics={"map_at_r": 0.5, "precision_at_1": np.float32(0.75)},
        crop_rule=CROP_RULE,
        resume=resume_state(1, optimizer, scheduler, torch.Generator(), 0.5, "crops"),
    )
    return {
        "path": saved,
        "model": model.eval(),
        "loss": loss,
        "optimizer": optimizer,
        "config": config,
    }


def test_checkpoint_loads_with_plain_weights_only(trained):
    data = torch.load(trained["path"], weights_only=True)
    assert data["format"] == FORMAT and data["format_version"] == 1
    assert data["class_names"] == CLASSES
    assert isinstance(data["resume"]["rng"]["torch"], torch.Tensor)
    assert not list(trained["path"].parent.glob("*.sdml-tmp-*"))


def test_round_trip_keeps_everything(trained):
    ckpt = load_checkpoint(trained["path"])
    assert ckpt.path == trained["path"]
    assert (ckpt.backbone, ckpt.embedding_size, ckpt.input_size, ckpt.bands) == (
        "resnet18",
        16,
        32,
        4,
    )
    assert ckpt.model_spec == {
        "backbone": "resnet18",
        "embedding_size": 16,
        "in_channels": 4,
        "input_size": 32,
    }
    assert (ckpt.normalization, ckpt.mean, ckpt.std) == ("dataset", MEAN, STD)
    assert ckpt.class_names == CLASSES
    assert ckpt.loss_name == "proxy_anchor"
    assert ckpt.loss_params == {"margin": 0.1, "alpha": 32}
    assert torch.equal(ckpt.loss_state["proxies"], trained["loss"].proxies.detach())
    assert ckpt.train_config == config_to_dict(trained["config"])
    assert ckpt.metrics == {"map_at_r": 0.5, "precision_at_1": 0.75}
    assert type(ckpt.metrics["precision_at_1"]) is float
    assert ckpt.crop_rule == CROP_RULE
    for name, tensor in trained["model"].state_dict().items():
        assert torch.equal(ckpt.state_dict[name], tensor)
    assert ckpt.resume["epoch"] == 1
    assert ckpt.resume["scheduler"]["last_epoch"] == 1


def test_rebuilt_model_gives_the_same_embeddings(trained):
    model = build_model_from_checkpoint(load_checkpoint(trained["path"]))
    assert not model.training
    images = torch.randn(3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained["model"](images), rtol=0, atol=0)


def test_optimizer_state_resumes(trained):
    ckpt = load_checkpoint(trained["path"])
    model = build_model_from_checkpoint(ckpt)
    loss = Proxies()
    loss.load_state_dict(ckpt.loss_state)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss.parameters()), lr=1e-3)
    optimizer.load_state_dict(ckpt.resume["optimizer"])
    original = trained["optimizer"].state_dict()
    restored = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for key, state in original["state"].items():
        assert torch.equal(restored["state"][key]["exp_avg"], state["exp_avg"])


def test_rng_states_restore(tmp_path):
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    first = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    restore_rng_state(torch.load(path, weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]


def save_small(path, **changes):
    """Save a small RGB checkpoint with nothing but the required fields (and `changes`)."""
    fields = {
        "model": EmbeddingNet("resnet18", embedding_size=8, in_channels=3),
        "input_size": 64,
        "class_names": ["a", "b"],
        "normalization": "imagenet",
        "mean": [0.4] * 3,
        "std": [0.2] * 3,
        "loss_name": "triplet",
    }
    return save_checkpoint(path, **{**fields, **changes})


def test_checkpoint_without_resume_or_crop_rule(tmp_path):
    ckpt = load_checkpoint(save_small(tmp_path / "c.pt"))
    assert ckpt.resume is None and ckpt.crop_rule is None and ckpt.metrics == {}
    assert ckpt.loss_state == {} and ckpt.train_config == {}


def test_unloadable_values_are_refused_before_writing(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=r"crop_rule\.scaling: ndarray"):
        save_small(path, crop_rule={"scaling": np.zeros(2)})
    with pytest.raises(ValueError, match="one per band"):
        save_small(path, mean=[0.4] * 4, std=[0.2] * 4)
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(MissingInputError, match=r"nope\.pt: no such file"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"hello, I am text\n", "not a torch checkpoint file"), (b"", "not a torch checkpoint file")],
)
def test_non_torch_files(tmp_path, content, problem):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad\.pt: {problem}") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_plain_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(EmbeddingNet("resnet18", 8).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"weights\.pt: not a superdml checkpoint \(a plain"):
        load_checkpoint(path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "format_version": 1, "x": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: holds Python objects") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_other_format_version(tmp_path, trained):
    data = torch.load(trained["path"], weights_only=True)
    data["format_version"] = 2
    path = tmp_path / "future.pt"
    torch.save(data, path)
    with pytest.raises(
        CheckpointError,
        match=r"future\.pt: checkpoint format version 2.*reads"
        r" version 1",
    ):
        load_checkpoint(path)


def test_damaged_checkpoint(tmp_path, trained):
    data = torch.load(trained["path"], weights_only=True)
    del data["class_names"]
    path = tmp_path / "damaged.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=r"damaged\.pt: damaged checkpoint, 'class_names'"):
        load_checkpoint(path)
    data = torch.load(trained["path"], weights_only=True)
    data["model"]["backbone"] = "resnet34"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=r"damaged\.pt: model weights do not fit resnet34"):
        build_model_from_checkpoint(load_checkpoint(path))


def test_sha256_matches_hashlib_and_names_a_missing_checkpoint(tmp_path, trained):
    expected = hashlib.sha256(trained["path"].read_bytes()).hexdigest()
    assert checkpoint_sha256(trained["path"]) == expected
    with pytest.raises(MissingInputError, match=r"nope\.pt: no such file \(checkpoint\)"):
        checkpoint_sha256(tmp_path / "nope.pt")
