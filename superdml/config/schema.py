"""Typed stage configs: one frozen dataclass per stage, the single source of its options.

Every stage takes one config object. Each field's numpydoc ``Attributes`` entry is its
documentation everywhere: the command line builds one option per field from it
(:mod:`superdml.cli.options`), with the field's default. Range checks live in
each dataclass's ``__post_init__``. Loading and validation (:func:`load_config`,
:func:`from_dict`, ...) live in :mod:`superdml.config.load` and are
re-exported here.
"""

# long: one dataclass per stage, each documenting its fields for --help; the file reads
# as the reference of every config key, and splitting it would scatter that reference.

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from superdml.config.load import (
    check,
    config_hash,
    config_to_dict,
    dump_config,
    from_dict,
    load_config,
    parse_override,
)

__all__ = [
    "AugmentConfig",
    "Backbone",
    "CropsConfig",
    "EmbedConfig",
    "IndexConfig",
    "LabelConfig",
    "MaskMode",
    "Normalization",
    "Precision",
    "ReviewConfig",
    "SegmentBackend",
    "SegmentConfig",
    "SegmentDevice",
    "TTA",
    "TrainConfig",
    "UnknownRule",
    "VoteConfig",
    "VoteRule",
    "Weighting",
    "check",
    "config_hash",
    "config_to_dict",
    "dump_config",
    "from_dict",
    "load_config",
    "parse_override",
]

MaskMode = Literal["none", "outside", "alpha"]
SegmentBackend = Literal["auto", "numpy", "torch"]
SegmentDevice = Literal["auto", "cpu", "cuda"]
#: Vote weights of the labeling rule (:func:`superdml.search.vote.knn_vote`).
Weighting = Literal["similarity", "softmax"]
#: What votes (:meth:`superdml.search.reference.ReferenceIndex.vote`): the k nearest
#: references, or the nearest class means.
VoteRule = Literal["knn", "class_mean"]
#: Where a label becomes ``unknown``: below ``unknown_threshold``, or below the
#: reference's per-class thresholds set by ``superdml index``.
UnknownRule = Literal["threshold", "calibrated"]
#: Test-time augmentation of the embedder: none, or the mean over the 8 flips and
#: rotations of the square (the dihedral group D4).
TTA = Literal["none", "d4"]


@dataclass(frozen=True)
class SegmentConfig:
    """Parameters of ``superdml segment``.

    Attributes
    ----------
    region_size : int
        Approximate superpixel side S in pixels (the SLIC grid step).
    compactness : float
        Weight m of the spatial term; the SLIC distance is
        ``sum((band difference / m)**2) + (pixel distance / S)**2`` with bands scaled to
        [0, 1], the same meaning as scikit-image's ``compactness`` on such images.
    max_iter : int
        SLIC iterations per tile.
    tile_size : int
        Core tile side in pixels; rounded up to a multiple of `region_size`.
    bands : tuple of int or None
        1-based band indexes to segment on; all bands when None.
    nodata : float or None
        Value treated as nodata; the raster's own nodata/mask when None.
    backend : {"auto", "numpy", "torch"}
        SLIC implementation (:mod:`superdml.segment.slic_torch`); ``auto`` is ``torch``, the fastest
        on the CPU and the one that runs on a GPU. Both give the same superpixels up to
        floating-point ties.
    device : {"auto", "cpu", "cuda"}
        Where the torch backend runs; ``auto``: CUDA when torch sees a GPU.
    """

    region_size: int = 32
    compactness: float = 0.2
    max_iter: int = 10
    tile_size: int = 2048
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    backend: SegmentBackend = "auto"
    device: SegmentDevice = "auto"

    def __post_init__(self) -> None:
        check(self.region_size >= 2, "region_size", self.region_size, "an integer >= 2")
        check(self.compactness > 0, "compactness", self.compactness, "a number > 0")
        check(self.max_iter >= 1, "max_iter", self.max_iter, "an integer >= 1")
        check(
            self.tile_size >= 4 * self.region_size,
            "tile_size",
            self.tile_size,
            f"an integer >= 4 * region_size ({4 * self.region_size})",
        )
        if self.bands is not None:
            check(
                len(self.bands) > 0 and all(b >= 1 for b in self.bands),
                "bands",
                self.bands,
                "a non-empty list of 1-based band numbers",
            )
        for key, choices in (("backend", SegmentBackend), ("device", SegmentDevice)):
            value = getattr(self, key)
            check(value in get_args(choices), key, value, "one of " + ", ".join(get_args(choices)))


@dataclass(frozen=True)
class CropsConfig:
    """Parameters of ``superdml crops`` (and the crop rule every later stage reuses).

    Attributes
    ----------
    crop_size : int
        Side of the square crop in pixels, centered on the superpixel centroid.
    mask : {"none", "outside", "alpha"}
        What happens to pixels outside the superpixel: kept, zeroed, or kept with the
        superpixel mask as a fourth (alpha) band.
    bands : tuple of int or str, or None
        Bands of the crop, by 1-based number or by the raster's band description
        (``B08``, ``nir``); every band but alpha when None. 8-bit rasters of at most
        three bands give 8-bit color PNG crops; others keep the bands at their dtype
        (TIFF chips with a PNG preview beside).
    preview : tuple of int or str, or None
        The three bands (red, green, blue) of the preview PNG beside lossless crops;
        true color (bands described B04/B03/B02 or red/green/blue) or the first three
        when None.
    context : int or None
        A second, wider view of each superpixel: a square this many times the crop's
        side around the same center, averaged down to the crop's size and stacked after
        the crop's bands (never masked), so the model sees what surrounds the
        superpixel; crops are then TIFF chips with a PNG preview beside. None: the crop
        alone.
    sample : int or None
        Draw this many superpixels at random.
    per_class : int or None
        Keep at most this many superpixels per class (needs a label raster).
    seed : int
        Seed of the random draws.
    min_purity : float
        Minimum majority share of the label raster under a superpixel.
    """

    crop_size: int = 64
    mask: MaskMode = "none"  # benchmarks/quality.py: the best of the three on the demo
    bands: tuple[int | str, ...] | None = None
    preview: tuple[int | str, ...] | None = None
    context: int | None = None
    sample: int | None = None
    per_class: int | None = None
    seed: int = 0
    min_purity: float = 0.8

    def __post_init__(self) -> None:
        check(self.crop_size >= 4, "crop_size", self.crop_size, "an integer >= 4")
        check(self.mask in get_args(MaskMode), "mask", self.mask, "one of none, outside, alpha")
        for key, value, most in (("bands", self.bands, None), ("preview", self.preview, 3)):
            if value is not None:
                named = all(b if isinstance(b, str) else b > 0 for b in value)
                check(
                    1 <= len(value) <= (most or len(value)) and named,
                    key,
                    value,
                    f"{'1 to 3' if most else 'a list of'} band numbers (1-based) or descriptions",
                )
        check(
            self.context is None or self.context >= 2,
            "context",
            self.context,
            "null or an integer >= 2 (the wider view's side, in crop sizes)",
        )
        check(self.sample is None or self.sample >= 1, "sample", self.sample, "an integer >= 1")
        check(
            self.per_class is None or self.per_class >= 1,
            "per_class",
            self.per_class,
            "an integer >= 1",
        )
        check(
            self.sample is None or self.per_class is None,
            "sample",
            self.sample,
            "sample or per_class, not both",
        )
        check(0.0 <= self.min_purity <= 1.0, "min_purity", self.min_purity, "a number in [0, 1]")


# --------------------------------------------------------------------------- training

Backbone = Literal["resnet18", "resnet34", "resnet50"]
Normalization = Literal["imagenet", "dataset"]
#: Inference arithmetic: bf16 where the hardware computes it (``auto``), or forced.
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (the ``augment:`` section of a training config).

    Attributes
    ----------
    hflip, vflip : bool
        Random horizontal / vertical flips (probability 0.5 each).
    rot90 : bool
        Random rotation by a multiple of 90 degrees.
    color_jitter : float
        Strength s of brightness, contrast and saturation jitter: each factor is drawn
        from ``[1 - s, 1 + s]``. Applied to the RGB bands only, never to the alpha mask.
        0 turns it off.
    random_resized_crop : float or None
        Minimum area fraction of a random crop (aspect ratio in [3/4, 4/3]) that is
        resized back to the input size; the same geometry applies to every band,
        alpha included. None turns it off.
    """

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    color_jitter: float = 0.2
    random_resized_crop: float | None = 0.8

    def __post_init__(self) -> None:
        check(
            0.0 <= self.color_jitter < 1.0,
            "color_jitter",
            self.color_jitter,
            "a number in [0, 1) (0 = off)",
        )
        check(
            self.random_resized_crop is None or 0.0 < self.random_resized_crop <= 1.0,
            "random_resized_crop",
            self.random_resized_crop,
            "a minimum area fraction in (0, 1], or null to turn it off",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Parameters of ``superdml train`` (the source of truth for the training YAML files).

    Attributes
    ----------
    backbone : {"resnet18", "resnet34", "resnet50"}
        torchvision ResNet used as feature extractor.
    pretrained : bool
        Start from torchvision's ImageNet weights (downloaded once into the torch hub
        cache, ``$TORCH_HOME``); fails with a clear error when offline and not cached.
    weights_path : str or None
        A local torchvision state_dict of `backbone` to start from instead of the
        download; takes precedence over `pretrained`.
    embedding_size : int
        Dimension D of the L2-normalized embedding.
    input_size : int
        Side in pixels of the square model input; crops are resized to it.
    normalization : {"imagenet", "dataset"}
        Band mean/std: ImageNet's (alpha band 0.5/0.5) or computed from the training
        folder.
    loss : str
        Name of the metric learning loss in the loss registry (triplet, proxy_nca,
        proxy_anchor or soft_triple); without a config file ``superdml train`` starts
        from the shipped ``configs/losses/<loss>.yaml``.
    loss_params : dict
        Keyword arguments of the loss (margin, alpha, ...); on the command line a YAML
        mapping (``{margin: 0.2}``).
    lr : float
        Learning rate of the network (AdamW).
    proxy_lr : float
        Learning rate of learned proxies / centers of proxy-based losses.
    weight_decay : float
        AdamW weight decay.
    warmup_epochs : int
        Epochs of linear learning-rate warmup (at most `epochs`).
    epochs : int
        Training epochs; one epoch visits every training sample at least once.
    classes_per_batch : int
        P, classes in each batch (all classes when there are fewer).
    samples_per_class : int
        K, samples of each class in a batch (batch size P * K).
    val_fraction : float
        Share of each class held out for validation (stratified); 0 = none.
    seed : int
        Seed of the split, sampler, augmentation and weight initialization.
    num_workers : int
        DataLoader worker processes; 0 loads in the training process.
    augment : AugmentConfig
        Training-time augmentation.
    """

    backbone: Backbone = "resnet18"
    pretrained: bool = False
    weights_path: str | None = None
    embedding_size: int = 128
    input_size: int = 64
    normalization: Normalization = "dataset"
    loss: str = "proxy_anchor"
    loss_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = 1e-3
    proxy_lr: float = 1e-2
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    epochs: int = 10
    classes_per_batch: int = 8
    samples_per_class: int = 8
    val_fraction: float = 0.2
    seed: int = 0
    num_workers: int = 0
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check(
            self.backbone in get_args(Backbone),
            "backbone",
            self.backbone,
            "one of " + ", ".join(get_args(Backbone)),
        )
        check(
            self.normalization in get_args(Normalization),
            "normalization",
            self.normalization,
            "one of " + ", ".join(get_args(Normalization)),
        )
        check(self.embedding_size >= 2, "embedding_size", self.embedding_size, "an integer >= 2")
        check(self.input_size >= 16, "input_size", self.input_size, "an integer >= 16")
        check(bool(self.loss), "loss", self.loss, "a loss name")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.proxy_lr > 0, "proxy_lr", self.proxy_lr, "a number > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check(
            0 <= self.warmup_epochs <= self.epochs,
            "warmup_epochs",
            self.warmup_epochs,
            f"an integer in [0, epochs] ([0, {self.epochs}])",
        )
        check(
            self.classes_per_batch >= 2,
            "classes_per_batch",
            self.classes_per_batch,
            "an integer >= 2",
        )
        check(
            self.samples_per_class >= 1,
            "samples_per_class",
            self.samples_per_class,
            "an integer >= 1",
        )
        check(
            0.0 <= self.val_fraction < 1.0,
            "val_fraction",
            self.val_fraction,
            "a number in [0, 1)",
        )
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")


@dataclass(frozen=True)
class EmbedConfig:
    """How a checkpoint's model embeds crops (``index``, ``label``, ``infer``, ``evaluate``).

    Attributes
    ----------
    batch_size : int
        Crops per forward pass (``label`` pads the last batch of a tile to it).
    precision : {"auto", "fp32", "bf16"}
        Arithmetic of the model: ``auto`` is bf16 autocast where the device computes bf16
        in hardware (CUDA, a CPU with AVX-512 BF16 or AMX), float32 elsewhere.
    tta : {"none", "d4"}
        Test-time augmentation: ``d4`` embeds each crop as the normalized mean of its
        8 flips and rotations (8 times the model's work); index and label alike.
    """

    batch_size: int = 256
    precision: Precision = "auto"
    tta: TTA = "none"

    def __post_init__(self) -> None:
        check(
            self.precision in get_args(Precision),
            "precision",
            self.precision,
            "one of " + ", ".join(get_args(Precision)),
        )
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.tta in get_args(TTA), "tta", self.tta, "one of " + ", ".join(get_args(TTA)))


@dataclass(frozen=True)
class VoteConfig(EmbedConfig):
    """The labeling rule: ``label``, ``infer`` and ``evaluate`` all label a crop by it.

    Its fields (with :class:`EmbedConfig`'s) are the keys of a label config that
    ``infer`` and ``evaluate`` read, so one ``label.yaml`` gives a crop one label
    whichever command asks.

    Attributes
    ----------
    k : int
        Nearest references that vote.
    weighting : {"similarity", "softmax"}
        Vote weights: the similarities, or their softmax with `temperature`.
    temperature : float
        Softmax temperature of the ``softmax`` weighting.
    vote : {"knn", "class_mean"}
        Who votes: the k nearest references, or the mean embedding of every class
        (nearest class mean); a crop that is a labeled reference keeps its class.
    class_balance : float
        Class-aware ``knn`` vote: each neighbour's weight is multiplied by its class's
        reference count to the power ``-class_balance`` (0: every reference counts
        alike; 1: every class weighs alike, however many references it has).
    unknown : {"threshold", "calibrated"}
        ``threshold``: unknown below `unknown_threshold` (when set); ``calibrated``:
        below the per-class thresholds ``superdml index`` set on the reference
        (``IndexConfig.calibration_recall``).
    unknown_threshold : float or None
        Similarity to the nearest reference below which the label is ``unknown``.
    """

    k: int = 10
    weighting: Weighting = "similarity"
    temperature: float = 0.1
    vote: VoteRule = "knn"
    class_balance: float = 0.0
    unknown: UnknownRule = "threshold"
    unknown_threshold: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.k >= 1, "k", self.k, "an integer >= 1")
        check(
            self.weighting in get_args(Weighting),
            "weighting",
            self.weighting,
            "one of " + ", ".join(get_args(Weighting)),
        )
        check(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        check(self.vote in get_args(VoteRule), "vote", self.vote, "one of knn, class_mean")
        check(
            0.0 <= self.class_balance <= 1.0,
            "class_balance",
            self.class_balance,
            "a number in [0, 1]",
        )
        check(
            self.unknown in get_args(UnknownRule),
            "unknown",
            self.unknown,
            "one of threshold, calibrated",
        )
        check(
            self.unknown == "threshold" or self.unknown_threshold is None,
            "unknown_threshold",
            self.unknown_threshold,
            "null with unknown: calibrated (the reference's thresholds apply)",
        )
        check(
            self.unknown_threshold is None or -1.0 <= self.unknown_threshold <= 1.0,
            "unknown_threshold",
            self.unknown_threshold,
            "a cosine similarity in [-1, 1]",
        )


@dataclass(frozen=True)
class LabelConfig(VoteConfig):
    """Parameters of ``superdml label``: the labeling rule (:class:`VoteConfig`) and tiling.

    Attributes
    ----------
    tile_size : int
        Side of the raster tiles that are the unit of work.
    crop_size : int or None
        Crop side; the checkpoint's crop rule when None.
    keep_embeddings : bool
        Also write each tile's embeddings (float16), so a later run with the same
        checkpoint and a new reference only re-votes.
    """

    tile_size: int = 1024
    crop_size: int | None = None
    keep_embeddings: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.tile_size >= 64, "tile_size", self.tile_size, "an integer >= 64")
        check(
            self.crop_size is None or self.crop_size >= 4,
            "crop_size",
            self.crop_size,
            "an integer >= 4",
        )


# ------------------------------------------------------------------------ reference index


@dataclass(frozen=True)
class IndexConfig(EmbedConfig):
    """Parameters of ``superdml index`` (the reference index of labeled crops).

    Attributes
    ----------
    ivf_threshold : int
        Reference sets larger than this get an approximate IVF index
        (``faiss.IndexIVFFlat``); smaller ones an exact ``faiss.IndexFlatIP``.
    nlist : int or None
        Inverted lists of the IVF index; ``round(4 * sqrt(N))`` for N references when None.
    nprobe : int
        Inverted lists visited per query by an IVF search (more: slower, closer to exact).
    calibration_recall : float or None
        Set per-class unknown thresholds (``unknown: calibrated``) that keep this share
        of each class's reference crops, each left out of the reference in turn; None:
        set none.
    """

    ivf_threshold: int = 100_000
    nlist: int | None = None
    nprobe: int = 32
    calibration_recall: float | None = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.ivf_threshold >= 1, "ivf_threshold", self.ivf_threshold, "an integer >= 1")
        check(self.nlist is None or self.nlist >= 1, "nlist", self.nlist, "an integer >= 1")
        check(self.nprobe >= 1, "nprobe", self.nprobe, "an integer >= 1")
        check(
            self.calibration_recall is None or 0.0 < self.calibration_recall <= 1.0,
            "calibration_recall",
            self.calibration_recall,
            "a number in (0, 1] or null",
        )


# --------------------------------------------------------------------------------- review


@dataclass(frozen=True)
class ReviewConfig:
    """Parameters of ``superdml review`` (the least certain superpixels, for relabeling).

    Attributes
    ----------
    max_score : float
        Candidates have a kNN vote share (``score``) at most this.
    unknown : bool
        Also take every superpixel labeled ``unknown``, whatever its score.
    per_class : int or None
        At most this many crops per predicted class (then `limit` is not applied).
    limit : int
        At most this many crops in all, when `per_class` is None.
    diverse : bool
        Spread the picks over the embedding space (k-means over a pool of the least
        certain candidates, the member nearest each centroid) instead of only the lowest.
    seed : int
        Seed of the k-means of `diverse`.
    """

    max_score: float = 0.6
    unknown: bool = False
    per_class: int | None = None
    limit: int = 200
    diverse: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check(0.0 <= self.max_score <= 1.0, "max_score", self.max_score, "a number in [0, 1]")
        check(
            self.per_class is None or self.per_class >= 1,
            "per_class",
            self.per_class,
            "an integer >= 1",
        )
        check(self.limit >= 1, "limit", self.limit, "an integer >= 1")
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
