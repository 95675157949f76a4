"""Deep metric learning.

Data, models, losses, training, checkpoints, the embedder, metrics, evaluation.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "checkpoint": [
            "Checkpoint",
            "FORMAT",
            "FORMAT_VERSION",
            "build_model_from_checkpoint",
            "checkpoint_sha256",
            "load_checkpoint",
            "save_checkpoint",
        ],
        "augment": [
            "TrainTransform",
        ],
        "data": [
            "IMAGE_SUFFIXES",
            "IMAGE_SUFFIXES_TEXT",
            "ImageFolderDataset",
            "Transform",
        ],
        "embed": [
            "Embedder",
            "autocast",
            "cpu_has_bf16",
            "load_embedder",
            "prepare_model",
            "resolve_precision",
            "to_device",
        ],
        "evaluate": [
            "CONFUSION_PNG",
            "EvaluateResult",
            "METRICS_JSON",
            "PREDICTIONS_PARQUET",
            "SEED",
            "SIMILARITY_CLASSES",
            "SIMILARITY_PER_CLASS",
            "SIMILARITY_PNG",
            "TSNE_MAX_POINTS",
            "TSNE_PNG",
            "confusion_matrix",
            "sample_examples",
            "tsne_2d",
        ],
        "metrics": [
            "NEIGHBOR_BUDGET",
            "retrieval_metrics",
        ],
        "normalization": [
            "ALPHA_MEAN",
            "ALPHA_STD",
            "IMAGENET_MEAN",
            "IMAGENET_STD",
            "MIN_STD",
            "band_statistics",
            "imagenet_statistics",
        ],
        "models": [
            "BACKBONES",
            "EmbeddingNet",
            "build_model",
            "model_spec",
        ],
        "resume": [
            "open_resume",
            "restore",
            "resume_state",
            "warm_start",
        ],
        "rng": [
            "capture_rng_state",
            "restore_rng_state",
            "seed_everything",
            "seed_worker",
        ],
        "sampling": [
            "PKSampler",
            "stratified_split",
        ],
        "train": [
            "BEST",
            "CONFIG_YAML",
            "LAST",
            "METRICS_CSV",
            "SELECTION_METRIC",
            "TENSORBOARD_DIR",
            "TRAIN_FILES",
            "TrainResult",
            "build_optimizer",
            "build_scheduler",
            "lr_factor",
            "training_config_path",
            "training_precision",
        ],
        "train_log": [
            "EpochLog",
        ],
        "training_data": [
            "TrainingData",
            "load_training_data",
        ],
        "calibration": [
            "ECE_BINS",
            "Reliability",
            "expected_calibration_error",
            "reliability_bins",
        ],
    },
)
