import csv
import dataclasses
import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_crop_folders

import superdml.learn.train as train_module
from superdml.cli.commands import cli
from superdml.config.schema import TrainConfig, load_config
from superdml.config.shipped import loss_config_path
from superdml.core.errors import CheckpointError, ConfigError
from superdml.crops.folder import CROPS_TABLE
from superdml.crops.rule import CropRule
from superdml.learn.checkpoint import load_checkpoint
from superdml.learn.losses import get_loss
from superdml.learn.models import build_model
from superdml.learn.train import (
    build_optimizer,
    lr_factor,
    train,
    training_config_path,
)

LOSSES = ("triplet", "proxy_nca", "proxy_anchor", "soft_triple")
CLASSES = ("brick", "grass", "gravel", "coffee")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Training (16 per class) and validation (12 per class, other crops) folders."""
    root = tmp_path_factory.mktemp("textures")
    return (
        make_crop_folders(root / "train", classes=CLASSES, per_class=16, size=(32, 48)),
        make_crop_folders(root / "val", classes=CLASSES, per_class=12, size=(32, 48), seed=1),
    )


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """A training folder of 8 crops per class: two batches an epoch, for the mechanics."""
    root = tmp_path_factory.mktemp("few")
    return make_crop_folders(root, classes=CLASSES, per_class=8, size=(32, 48))


def tiny(**changes):
    """ResNet-18 at 32 px with a 32-D embedding, 4 classes x 4 samples per batch."""
    params = {
        "input_size": 32,
        "embedding_size": 32,
        "classes_per_batch": 4,
        "samples_per_class": 4,
        "lr": 0.002,
        "proxy_lr": 0.02,
        "warmup_epochs": 0,
        "epochs": 2,
    }
    return TrainConfig(**{**params, **changes})


def no_steps(*args, **kwargs):
    """Stand-in for an epoch of training that takes no optimizer step."""
    return 0.0


# ----------------------------------------------------------------- pure pieces


def test_lr_factor_warms_up_linearly_then_decays_by_cosine():
    factors = [lr_factor(s, warmup_steps=4, total_steps=12) for s in range(14)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[8] == pytest.approx(0.5)
    assert factors[6] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factors[12] == factors[13] == pytest.approx(0.0)
    assert lr_factor(0, 0, 10) == 1.0


@pytest.mark.parametrize("loss", LOSSES)
def test_optimizer_trains_the_proxies_at_proxy_lr(loss):
    config = tiny(loss=loss, weight_decay=0.01)
    model = build_model(config, 3)
    criterion = get_loss(loss, 5, config.embedding_size)
    optimizer = build_optimizer(model, criterion, config)
    groups = optimizer.param_groups
    assert all(p is q for p, q in zip(groups[0]["params"], model.parameters(), strict=True))
    assert groups[0]["lr"] == config.lr
    if loss == "triplet":
        assert len(groups) == 1
    else:
        assert len(groups) == 2 and groups[1]["lr"] == config.proxy_lr
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in criterion.parameters()}
    assert all(g["weight_decay"] == 0.01 for g in groups)
    assert all(g["fused"] for g in groups)  # on the CPU: one kernel, 4x faster here


def test_the_fused_step_is_torchs_reference_adamw_step():
    config = tiny(loss="proxy_anchor", weight_decay=0.01)
    torch.manual_seed(0)
    models = [build_model(config, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    criteria = [get_loss("proxy_anchor", 4, config.embedding_size) for _ in range(2)]
    criteria[1].load_state_dict(criteria[0].state_dict())
    fused = build_optimizer(models[0], criteria[0], config)
    reference = torch.optim.AdamW(
        [{"params": list(models[1].parameters()), "lr": config.lr},
         {"params": list(criteria[1].parameters()), "lr": config.proxy_lr}],
        weight_decay=config.weight_decay, foreach=False,
    )  # fmt: skip
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(4).repeat(2)
    for model, criterion, optimizer in zip(models, criteria, (fused, reference), strict=True):
        for _ in range(3):
            optimizer.zero_grad()
            criterion(model(images), labels).backward()
            optimizer.step()
    for a, b in zip(
        [*models[0].parameters(), *criteria[0].parameters()],
        [*models[1].parameters(), *criteria[1].parameters()], strict=True,
    ):  # fmt: skip
        # Adam divides by the root of tiny second moments: summation orders differ in the
        # last bits, so up to 1% of the learning rate (three steps move up to 3x it)
        torch.testing.assert_close(a, b, rtol=0, atol=0.01 * config.lr)


def test_config_lookup():
    assert loss_config_path("triplet").name == "triplet.yaml"
    assert loss_config_path("nope") is None and loss_config_path(None) is None
    for loss in LOSSES:
        config = load_config(loss_config_path(loss), TrainConfig)
        assert config.loss == loss
        text = yaml.safe_load(loss_config_path(loss).read_text())
        assert set(text) == set(TrainConfig.__dataclass_fields__)  # every key spelled out


def test_training_config_path_prefers_config_then_the_runs_own(tmp_path):
    (tmp_path / "train.yaml").write_text("epochs: 3\n")
    assert training_config_path("x.yaml", "triplet", tmp_path, True).name == "x.yaml"
    assert training_config_path(None, "triplet", tmp_path, True) == tmp_path / "train.yaml"
    assert training_config_path(None, "triplet", tmp_path, False).name == "triplet.yaml"


# ------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_learns_the_textures(folders, tmp_path, loss):
    train_dir, val_dir = folders
    result = train(train_dir, tmp_path, tiny(loss=loss, epochs=4), val_dir=val_dir, device="cpu")
    # chance is 1/4; an untrained network gets a precision@1 of about 0.5 and a MAP@R
    # of about 0.3 here, four epochs 0.75-0.81 and 0.57-0.61
    assert result.metrics["precision_at_1"] >= 0.6
    assert result.metrics["map_at_r"] >= 0.45
    assert result.epochs_run == 4 and result.best_path.exists() and result.last_path.exists()
    rows = list(csv.DictReader(result.metrics_path.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert {"train_loss", "lr", "map_at_r", "precision_at_1", "nmi", "seconds"} <= set(rows[0])
    best = load_checkpoint(result.best_path)
    assert best.metrics["map_at_r"] == max(float(r["map_at_r"]) for r in rows)
    assert best.resume is None and load_checkpoint(result.last_path).resume["epoch"] == 4
    assert best.class_names == sorted(CLASSES) and best.bands == 3 and best.loss_name == loss
    assert load_config(tmp_path / "train.yaml", TrainConfig) == tiny(loss=loss, epochs=4)
    assert any((tmp_path / "tb").iterdir())


def test_the_proxies_move(few, tmp_path, monkeypatch):
    config = tiny(epochs=1, val_fraction=0.0)
    trained = train(few, tmp_path / "trained", config, device="cpu")
    monkeypatch.setattr(train_module, "_train_epoch", no_steps)
    initial = train(few, tmp_path / "initial", config, device="cpu")
    before = load_checkpoint(initial.last_path).loss_state["proxies"]
    after = load_checkpoint(trained.last_path).loss_state["proxies"]
    assert before.shape == after.shape == (len(CLASSES), config.embedding_size)
    assert not torch.allclose(before, after, atol=1e-3)


def test_checkpoint_records_crop_rule_bands_and_normalization(crop_folders_rgba, tmp_path):
    folder = shutil.copytree(crop_folders_rgba, tmp_path / "rgba")
    rule = CropRule(crop_size=48, mask="alpha")
    table = pa.table({"file": pa.array([], pa.string())})
    meta = {"superdml": json.dumps({"crop_rule": rule.to_dict()})}
    pq.write_table(table.replace_schema_metadata(meta), folder / CROPS_TABLE)
    config = tiny(epochs=1, normalization="imagenet")
    result = train(folder, tmp_path / "out", config, device="cpu")
    ckpt = load_checkpoint(result.best_path)
    assert ckpt.bands == 4 and ckpt.crop_rule == rule.to_dict()
    assert ckpt.mean == pytest.approx([0.485, 0.456, 0.406, 0.5])
    assert ckpt.class_names == ["brick", "chelsea", "coffee", "grass"]
    assert ckpt.train_config["normalization"] == "imagenet" and ckpt.input_size == 32


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_continues_exactly(few, tmp_path, monkeypatch, workers):
    config = tiny(epochs=3, warmup_epochs=1, num_workers=workers)
    straight = train(few, tmp_path / "straight", config, device="cpu")

    class Crash(Exception):
        pass

    calls = []

    def crash_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return real_epoch(*args, **kwargs)

    real_epoch = train_module._train_epoch
    monkeypatch.setattr(train_module, "_train_epoch", crash_in_third_epoch)
    with pytest.raises(Crash):
        train(few, tmp_path / "resumed", config, device="cpu")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt").resume["epoch"] == 2
    resumed = train(few, tmp_path / "resumed", config, resume=True, device="cpu")

    assert resumed.epochs_run == 1 and straight.epochs_run == 3
    a, b = load_checkpoint(straight.last_path), load_checkpoint(resumed.last_path)
    for key, value in a.state_dict.items():
        assert torch.equal(value, b.state_dict[key]), key
    assert torch.equal(a.loss_state["proxies"], b.loss_state["proxies"])
    for key, value in a.resume["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], b.resume["optimizer"]["state"][key]["exp_avg_sq"])
    rows_a = list(csv.DictReader(straight.metrics_path.open()))
    rows_b = list(csv.DictReader(resumed.metrics_path.open()))
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert {k: v for k, v in row_a.items() if k != "seconds"} == {
            k: v for k, v in row_b.items() if k != "seconds"
        }


def test_resume_refuses_another_config_and_a_finished_run(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_train_epoch", no_steps)
    train(folders[0], tmp_path, tiny(epochs=1), device="cpu")
    with pytest.raises(ConfigError, match="trained with lr=0.002, got 0.1"):
        train(folders[0], tmp_path, tiny(epochs=2, lr=0.1), resume=True, device="cpu")
    with pytest.raises(ConfigError, match="already trained 1 of 1 epochs"):
        train(folders[0], tmp_path, tiny(epochs=1), resume=True, device="cpu")
    result = train(folders[0], tmp_path, tiny(epochs=2), resume=True, device="cpu")
    assert result.epochs_run == 1 and load_checkpoint(result.last_path).resume["epoch"] == 2


def test_init_keeps_shared_proxies_and_adds_new_ones(tmp_path, monkeypatch):
    abc = make_crop_folders(tmp_path / "abc", classes=("brick", "grass", "gravel"), per_class=8)
    abd = make_crop_folders(tmp_path / "abd", classes=("brick", "coffee", "grass"), per_class=8)
    monkeypatch.setattr(train_module, "_train_epoch", no_steps)  # keep the initial state
    old = train(abc, tmp_path / "old", tiny(epochs=1, seed=1), device="cpu")
    new = train(abd, tmp_path / "new", tiny(epochs=1), init=old.last_path, device="cpu")
    scratch = train(abd, tmp_path / "scratch", tiny(epochs=1), device="cpu")
    old_ckpt, new_ckpt = load_checkpoint(old.last_path), load_checkpoint(new.last_path)
    old_p, new_p = old_ckpt.loss_state["proxies"], new_ckpt.loss_state["proxies"]
    scratch_p = load_checkpoint(scratch.last_path).loss_state["proxies"]
    assert new_ckpt.class_names == ["brick", "coffee", "grass"]
    assert torch.equal(new_p[0], old_p[0]) and torch.equal(new_p[2], old_p[1])  # brick, grass
    assert torch.equal(new_p[1], scratch_p[1])  # coffee: a fresh proxy, as without --init
    assert not torch.equal(new_p[1], old_p[2])
    for key, value in old_ckpt.state_dict.items():
        assert torch.equal(value, new_ckpt.state_dict[key]), key


def test_init_keeps_the_codes_of_the_classes_that_stayed(tmp_path, monkeypatch):
    abc = make_crop_folders(tmp_path / "abc", classes=("brick", "grass", "gravel"), per_class=4)
    scheme_file = abc / "classes.yaml"
    scheme_file.write_text('10: brick\n20: {name: grass, color: "#00ff00"}\n30: gravel\n')
    abd = make_crop_folders(tmp_path / "abd", classes=("brick", "coffee", "grass"), per_class=4)
    monkeypatch.setattr(train_module, "_train_epoch", no_steps)
    old = train(abc, tmp_path / "old", tiny(epochs=1), device="cpu")
    new = train(abd, tmp_path / "new", tiny(epochs=1), init=old.last_path, device="cpu")
    scheme = load_checkpoint(new.last_path).class_scheme
    assert scheme.codes == {"brick": 10, "grass": 20, "gravel": 30, "coffee": 31}
    assert scheme.entries[1].color == (0, 255, 0)
    scratch = train(abd, tmp_path / "scratch", tiny(epochs=1), device="cpu")
    assert load_checkpoint(scratch.last_path).class_scheme.codes == {
        "brick": 1,
        "coffee": 2,
        "grass": 3,
    }


def test_init_refuses_a_checkpoint_of_another_network(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_train_epoch", no_steps)
    old = train(folders[0], tmp_path / "old", tiny(epochs=1), device="cpu")
    with pytest.raises(CheckpointError, match="embedding size 32 .* embedding size 16"):
        train(folders[0], tmp_path / "new", tiny(embedding_size=16), init=old.last_path)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error(folders, tmp_path):
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        train(folders[0], tmp_path, tiny(), device="cuda")


# ------------------------------------------------------------------------ CLI


def test_cli_trains_with_the_shipped_config_and_resumes_longer(few, tmp_path):
    out = tmp_path / "run"
    args = ["--quiet", "train", "--train-dir", str(few), "--loss", "triplet"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert str(out / "best.pt") in result.output
    shipped = load_config(loss_config_path("triplet"), TrainConfig)
    assert load_config(out / "train.yaml", TrainConfig) == dataclasses.replace(shipped, epochs=1)
    result = CliRunner().invoke(
        cli, ["-q", "train", "--train-dir", str(few), "--out", str(out), "--resume",
              "--epochs", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader((out / "metrics.csv").open()))) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-dir", "{empty}"], "hollow: class folder has no readable images"),
        (["--train-dir", "{one}"], "one: only one class folder"),
        (["--train-dir", "{missing}"], "missing: no such folder"),
        (["--val-dir", "{strange}"], "strange/astronaut: validation class 'astronaut' is not"),
        (["--config", "{typo}"], "typo.yaml: unknown key 'warmup_epoch' (did you mean"),
        (["--config", "{badtype}"], "badtype.yaml: lr: got 'fast', expected a number"),
        (["--loss", "proxy_anchr"], "did you mean 'proxy_anchor'"),
        (["--resume"], "last.pt: no such file"),
        (["--init", "{notes}"], "notes.txt: "),  # CheckpointError naming the file
        (["--train-dir", "{unnamed}"], "classes.yaml: class folder 'grass' is not in the class"),
        (["--train-dir", "{uncolored}"], "classes.yaml: color 'green' for code 2 is not a color"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(folders, tmp_path, args, message):
    empty = tmp_path / "empty"
    make_crop_folders(empty, classes=("brick", "grass"), per_class=2, size=32)
    (empty / "hollow").mkdir()
    one = make_crop_folders(tmp_path / "one", classes=("brick",), per_class=2, size=32)
    (tmp_path / "typo.yaml").write_text("warmup_epoch: 1\n")
    (tmp_path / "badtype.yaml").write_text("lr: fast\n")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    strange = make_crop_folders(tmp_path / "strange", classes=("brick", "astronaut"), per_class=2)
    unnamed = make_crop_folders(tmp_path / "unnamed", classes=("brick", "grass"), per_class=2)
    (unnamed / "classes.yaml").write_text("1: brick\n")
    uncolored = make_crop_folders(tmp_path / "uncolored", classes=("brick", "grass"), per_class=2)
    (uncolored / "classes.yaml").write_text("1: brick\n2: {name: grass, color: green}\n")
    paths = {"empty": empty, "one": one, "missing": tmp_path / "missing", "strange": strange}
    paths |= {"unnamed": unnamed, "uncolored": uncolored}
    paths |= {k: tmp_path / f"{k}.yaml" for k in ("typo", "badtype")}
    paths["notes"] = tmp_path / "notes.txt"
    argv = [a.format(**paths) for a in args]
    if "--train-dir" not in argv:
        argv += ["--train-dir", str(folders[0])]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["-q", "train", *argv, "--out", str(out), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_a_second_run_into_the_same_folder_needs_resume(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_train_epoch", no_steps)
    train(folders[0], tmp_path, tiny(epochs=1), device="cpu")
    with pytest.raises(ValueError, match="last.pt: a training run is already here"):
        train(folders[0], tmp_path, tiny(epochs=1), device="cpu")
