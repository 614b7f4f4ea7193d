"""SemHiTok: a discrete image tokenizer with a semantic-guided hierarchical codebook.

Public API (what `mllm` may use) is exactly the names exported here.
"""

from semhitok.assets import (
    AssetError,
    PackagedFile,
    cache_dir,
    inception_path,
    packaged_file,
    verify_folder,
    write_manifest,
)
from semhitok.atomic import atomic_folder
from semhitok.configio import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict
from semhitok.data import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadItem,
    ImageFolderDataset,
    ImageLoadError,
    JsonlImageDataset,
    SkipCounter,
    collate_skip_bad,
    load_image,
    read_jsonl,
    resize_center_crop,
    to_pil,
    to_rgb,
    to_tensor,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadItem",
    "ImageFolderDataset",
    "ImageLoadError",
    "JsonlImageDataset",
    "SkipCounter",
    "collate_skip_bad",
    "load_image",
    "read_jsonl",
    "resize_center_crop",
    "to_pil",
    "to_rgb",
    "to_tensor",
    "atomic_folder",
    "ConfigError",
    "apply_overrides",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
    "AssetError",
    "PackagedFile",
    "cache_dir",
    "inception_path",
    "packaged_file",
    "verify_folder",
    "write_manifest",
]
