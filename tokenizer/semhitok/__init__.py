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

__version__ = "0.1.0"

__all__ = [
    "AssetError",
    "PackagedFile",
    "cache_dir",
    "inception_path",
    "packaged_file",
    "verify_folder",
    "write_manifest",
]
