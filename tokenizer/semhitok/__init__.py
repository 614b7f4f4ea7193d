"""SemHiTok: a discrete image tokenizer with a semantic-guided hierarchical codebook.

The tokenizer API (what `mllm` may use) is exactly the names exported here: the model, its config and presets, the
token grid, the quantizers it composes and the teachers. Training (`semhitok.train`), losses (`semhitok.losses`),
metrics (`semhitok.metrics`) and probes (`semhitok.probe`) are imported from their modules when needed, so that
`import semhitok` stays light. Shared infrastructure (config loading, checkpoints, image I/O, CLI, ...) lives in
`semhitok.runtime`.
"""

from semhitok.config import (
    PRESETS,
    LossConfig,
    PixelConfig,
    QuantizerConfig,
    SemanticConfig,
    SemHiTokConfig,
    TeacherConfig,
)
from semhitok.model import SemHiTok
from semhitok.quantizers import (
    EMAQuantizer,
    FlatQuantizer,
    HierarchicalQuantizer,
    SharedIndexQuantizer,
    SubCodebookQuantizer,
)
from semhitok.teachers import Teacher, build_teacher
from semhitok.types import QuantizerOutput, TokenGrid

__version__ = "0.1.0"

__all__ = [
    "SemHiTok",
    "PRESETS",
    "LossConfig",
    "PixelConfig",
    "QuantizerConfig",
    "SemanticConfig",
    "SemHiTokConfig",
    "TeacherConfig",
    "QuantizerOutput",
    "TokenGrid",
    "EMAQuantizer",
    "FlatQuantizer",
    "HierarchicalQuantizer",
    "SharedIndexQuantizer",
    "SubCodebookQuantizer",
    "Teacher",
    "build_teacher",
]
