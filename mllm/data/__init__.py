"""Datasets for MLLM training and evaluation: LLaVA conversations, COCO captions/objects."""

from mllm.constants import IMAGE_PLACEHOLDER
from mllm.conversation import Turn
from mllm.data.coco import CocoDataset
from mllm.data.llava import (
    LlavaDataset,
    LlavaFormatError,
    LlavaSample,
    PlaceholderIssue,
    load_llava,
    parse_sample,
    placeholder_issues,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "CocoDataset",
    "LlavaDataset",
    "LlavaFormatError",
    "LlavaSample",
    "PlaceholderIssue",
    "Turn",
    "load_llava",
    "parse_sample",
    "placeholder_issues",
]
