"""Precision choice and the Embedder: bf16 where the hardware has it, fp32 otherwise."""

import numpy as np
import pytest
import torch
from checkpoints import save_untrained_checkpoint

import superdml.learn.embed as embed_module
from superdml.config.schema import IndexConfig, LabelConfig
from superdml.core.errors import ConfigError
from superdml.learn.embed import Embedder, cpu_has_bf16, resolve_precision

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")


def test_cpu_has_bf16_matches_the_kernels_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(embed_module, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(embed_module, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == torch.float32
    assert resolve_precision("fp32", CPU) == torch.float32


def test_bf16_without_hardware_support_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(embed_module, "cpu_has_bf16", lambda: False)
    message = r"precision: got 'bf16', but this CPU has no bf16 .*: use --precision auto or fp32"
    with pytest.raises(ConfigError, match=message):
        resolve_precision("bf16", CPU)


@pytest.mark.parametrize("config", [LabelConfig, IndexConfig])
def test_unknown_precision_is_a_config_error(config):
    message = "precision: got 'fp16', expected one of auto, fp32, bf16"
    with pytest.raises(ConfigError, match=message):
        config(precision="fp16")
    with pytest.raises(ConfigError, match="precision: got 'fp16'"):
        resolve_precision("fp16", CPU)


@needs_bf16
def test_bf16_embeddings_are_close_to_fp32(tmp_path, one_torch_thread):
    checkpoint = save_untrained_checkpoint(tmp_path / "m.pt", ["a", "b"], input_size=32)
    crops = np.random.default_rng(0).integers(0, 256, (40, 3, 48, 48), dtype=np.uint8)
    fp32 = Embedder.from_checkpoint(checkpoint, "cpu", "fp32")(crops, batch_size=16)
    bf16 = Embedder.from_checkpoint(checkpoint, "cpu", "bf16")(crops, batch_size=16)
    assert fp32.shape == bf16.shape == (40, 16) and bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, rtol=1e-6)
    cosine = (fp32 * bf16).sum(axis=1)
    assert cosine.min() > 0.995, cosine.min()
    assert not np.array_equal(fp32, bf16)  # bf16 really ran


def test_d4_tta_embeds_a_crop_and_its_flips_and_rotations_alike(tmp_path):
    path = save_untrained_checkpoint(tmp_path / "ckpt.pt", ["a", "b"], input_size=16)
    plain = Embedder.from_checkpoint(path, CPU, "fp32")
    d4 = Embedder.from_checkpoint(path, CPU, "fp32", tta="d4")
    crop = np.random.default_rng(0).integers(0, 256, (1, 3, 16, 16), dtype=np.uint8)
    views = np.concatenate([np.rot90(crop, 1, axes=(2, 3)), crop[..., ::-1], crop[..., ::-1, :]])
    crops = np.ascontiguousarray(np.concatenate([crop, views]))
    without = plain(crops, 8)
    assert np.abs(without[1:] @ without[0] - 1).max() > 1e-3  # the model itself is not invariant
    with_tta = d4(crops, 8)
    np.testing.assert_allclose(with_tta[1:], np.repeat(with_tta[:1], 3, axis=0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(with_tta, axis=1), 1.0, atol=1e-6)
    # the mean of the 8 views' normalized embeddings, normalized again
    views8 = [np.rot90(crop, t, axes=(2, 3)) for t in range(4)]
    views8 += [v[..., ::-1] for v in views8]
    mean = sum(plain(np.ascontiguousarray(v), 8) for v in views8)
    np.testing.assert_allclose(with_tta[:1], mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(ConfigError, match="tta: got 'd8', expected one of none, d4"):
        LabelConfig(tta="d8")
