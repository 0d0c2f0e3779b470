"""dmlgen.data: datasets, class-disjoint splits, class-balanced batch samplers and transforms.

Datasets return ``(image, label, index)`` and expose ``labels`` (int64, contiguous), ``classes``
(original names/ids), ``num_classes`` and ``groups``; batch composition is the samplers' job.
"""

from dmlgen.data.datasets import (
    IMAGE_EXTENSIONS,
    ArrayImageDataset,
    FileImageDataset,
    check_image_file,
    csv_dataset,
    image_folder_dataset,
    npz_dataset,
)
from dmlgen.data.omniglot import OmniglotSet, load_omniglot, omniglot_splits
from dmlgen.data.samplers import ClassBalancedBatchSampler
from dmlgen.data.splits import as_mask, kfold_classes, split_by_class_order, split_by_group, train_val_split
from dmlgen.data.transforms import TransformConfig, build_transforms, transform_config_from_dict

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "ClassBalancedBatchSampler",
    "FileImageDataset",
    "OmniglotSet",
    "TransformConfig",
    "as_mask",
    "build_transforms",
    "check_image_file",
    "csv_dataset",
    "image_folder_dataset",
    "kfold_classes",
    "load_omniglot",
    "npz_dataset",
    "omniglot_splits",
    "split_by_class_order",
    "split_by_group",
    "train_val_split",
    "transform_config_from_dict",
]
