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
from semhitok.config import (
    PRESETS,
    LossConfig,
    PixelConfig,
    QuantizerConfig,
    SemanticConfig,
    SemHiTokConfig,
    TeacherConfig,
)
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
from semhitok.losses import (
    InceptionPerceptualLoss,
    PerceptualLoss,
    adaptive_weight,
    build_discriminator,
    build_perceptual_loss,
    d_loss,
    g_loss,
    gan_active,
    pixel_losses,
    semantic_loss,
)
from semhitok.model import SemHiTok
from semhitok.modules import NLayerDiscriminator
from semhitok.quantizers import (
    EMAQuantizer,
    FlatQuantizer,
    HierarchicalQuantizer,
    SharedIndexQuantizer,
    SubCodebookQuantizer,
)
from semhitok.teachers import (
    HFSiglipTeacher,
    InceptionTeacher,
    OpenCLIPTeacher,
    Teacher,
    TinyViTTeacher,
    build_teacher,
)
from semhitok.types import QuantizerOutput, TokenGrid

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "LossConfig",
    "PixelConfig",
    "QuantizerConfig",
    "SemanticConfig",
    "SemHiTokConfig",
    "TeacherConfig",
    "InceptionPerceptualLoss",
    "PerceptualLoss",
    "adaptive_weight",
    "build_discriminator",
    "build_perceptual_loss",
    "d_loss",
    "g_loss",
    "gan_active",
    "pixel_losses",
    "semantic_loss",
    "SemHiTok",
    "NLayerDiscriminator",
    "EMAQuantizer",
    "FlatQuantizer",
    "HierarchicalQuantizer",
    "SharedIndexQuantizer",
    "SubCodebookQuantizer",
    "HFSiglipTeacher",
    "InceptionTeacher",
    "OpenCLIPTeacher",
    "Teacher",
    "TinyViTTeacher",
    "build_teacher",
    "QuantizerOutput",
    "TokenGrid",
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
