"""Data: the synthetic demo dataset, reading and validating users' datasets, and MONAI transforms."""

from veloxseg.data.datasets import (
    Case,
    DatasetError,
    DatasetSpec,
    class_frequencies,
    from_hf_dataset,
    kfold_splits,
    read_dataset,
    split_cases,
    validate_dataset,
    write_dataset_json,
    write_nnunet_case,
)
from veloxseg.data.demo import DemoCase, add_demo_data_parser, generate_case, make_demo_dataset
from veloxseg.data.transforms import (
    channel_infos,
    eval_transforms,
    make_dataset,
    normalisation_transforms,
    preprocessing_transforms,
    train_transforms,
)

__all__ = [
    "Case",
    "DatasetError",
    "DatasetSpec",
    "DemoCase",
    "add_demo_data_parser",
    "class_frequencies",
    "channel_infos",
    "eval_transforms",
    "from_hf_dataset",
    "generate_case",
    "kfold_splits",
    "make_dataset",
    "make_demo_dataset",
    "normalisation_transforms",
    "preprocessing_transforms",
    "read_dataset",
    "split_cases",
    "train_transforms",
    "validate_dataset",
    "write_dataset_json",
    "write_nnunet_case",
]
