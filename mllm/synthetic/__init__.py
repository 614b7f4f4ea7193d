"""The synthetic domain: a procedural world of coloured shapes on textured backgrounds with exact ground truth.

It is to this framework what MNIST is to a vision library: unlimited images (`sample_scene`, `render`), captions
(`captions`), GenEval-style prompts and scenes that satisfy them (`sample_geneval_entries`, `scene_for_entry`),
POPE/MME questions, LLaVA conversations, and an exact detector (`detect`, `score_geneval`) to score generated images.
"""

from mllm.synthetic.detector import (
    DetectedObject,
    DetectorConfig,
    detect,
    detection_accuracy,
    judge_geneval,
    match_objects,
    score_geneval,
)
from mllm.synthetic.questions import (
    GENEVAL_TAGS,
    MME_CATEGORIES,
    POPE_STRATEGIES,
    MMEScore,
    geneval_prompt,
    llava_conversation,
    mme_questions,
    mme_score,
    parse_yes_no,
    pope_questions,
    sample_geneval_entries,
    sample_geneval_entry,
    scene_for_entry,
)
from mllm.synthetic.render import PALETTE, render
from mllm.synthetic.scene import (
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    TEXTURES,
    Background,
    SamplerConfig,
    Scene,
    SceneObject,
    relative_position,
    sample_scene,
)
from mllm.synthetic.text import captions, describe

__all__ = [
    "CATEGORIES",
    "COLORS",
    "GENEVAL_TAGS",
    "MME_CATEGORIES",
    "PALETTE",
    "POPE_STRATEGIES",
    "RELATIONS",
    "SHAPES",
    "TEXTURES",
    "Background",
    "DetectedObject",
    "DetectorConfig",
    "MMEScore",
    "SamplerConfig",
    "Scene",
    "SceneObject",
    "captions",
    "describe",
    "detect",
    "detection_accuracy",
    "geneval_prompt",
    "judge_geneval",
    "llava_conversation",
    "match_objects",
    "mme_questions",
    "mme_score",
    "parse_yes_no",
    "pope_questions",
    "relative_position",
    "render",
    "sample_geneval_entries",
    "sample_geneval_entry",
    "sample_scene",
    "scene_for_entry",
    "score_geneval",
]
