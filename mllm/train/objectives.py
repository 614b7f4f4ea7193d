"""MLLM training objectives, one per stage (DESIGN §4, §10), chosen by `train.stage` through `OBJECTIVES`.

A stage says what trains by default (`PARTS`, the LLaVA recipe; the run config's `model:` may override each flag)
and computes the loss of a micro-batch: the model's token-weighted loss with its text (≈ understanding) and image
(generation) parts. Pre-training aligns the adapter only; instruction tuning trains adapter + LLM; text-to-image adds
the image head; joint trains everything.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


class StageObjective:
    """The loss of one micro-batch: {"loss", "loss_text", "loss_image"} from the model's forward."""

    name: ClassVar[str]
    PARTS: ClassVar[dict[str, Any]]

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return model(**{k: batch[k] for k in MODEL_INPUTS})


class AdapterAlignment(StageObjective):
    name = "pretrain"
    PARTS = {"train_adapter": True, "train_head": False, "train_special_tokens": False, "train_llm": "frozen"}


class InstructionTuning(StageObjective):
    name = "instruct"
    PARTS = {"train_adapter": True, "train_head": False, "train_special_tokens": True, "train_llm": "full"}


class TextToImage(StageObjective):
    name = "t2i"
    PARTS = {"train_adapter": True, "train_head": True, "train_special_tokens": True, "train_llm": "full"}


class Joint(TextToImage):
    name = "joint"  # trains what text-to-image trains, on the mixture of both directions


OBJECTIVES: dict[str, type[StageObjective]] = {o.name: o for o in (AdapterAlignment, InstructionTuning, TextToImage,
                                                                   Joint)}  # fmt: skip
STAGES = tuple(OBJECTIVES)
STAGE_PARTS: dict[str, dict[str, Any]] = {name: o.PARTS for name, o in OBJECTIVES.items()}
