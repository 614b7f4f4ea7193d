"""MLLM training objectives, one per stage (DESIGN §4, §10), chosen by `train.stage` through `OBJECTIVES`.

A stage says what trains by default (`PARTS`, the LLaVA recipe; the run config's `model:` may override each flag)
and computes the loss of a micro-batch from the model's text (≈ understanding) and image (generation) token means,
weighted as `train.loss` says (`LossConfig`: per-modality means by default, or one mean over all tokens).
Pre-training aligns the adapter only; instruction tuning trains adapter + LLM; text-to-image adds the image head;
joint trains everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "label_weights")


@dataclass(frozen=True)
class LossConfig:
    """How a micro-batch's text (≈ understanding) and image (generation) terms make the optimised loss (DESIGN §10).

    modality (default): text * (mean CE over the text targets) + image * (mean CE over the image targets); a term
        whose modality has no targets in the micro-batch is 0. Each direction gets its weight whatever its share of
        the tokens (an image is h*w targets, a yes/no answer two).
    tokens: (text * sum over text targets + image * sum over image targets) / (all targets): one mean over every
        labelled token (at weights 1 the loss before per-modality means existed).
    texture: the weight of the texture level inside the image term, whose mean is then the mean of -log p(i) +
        texture * -log p(j | i) (1: the image NLL; < 1 spends the generation gradient on the semantic codes, where
        what the caption says lives). The image means are weighted per target by the batch's `label_weights`
        (`data.t2i_box_weight`: object cells): Σ w * nll / Σ w over the micro-batch's image targets, so a weight is
        relative to the others (the term keeps its scale; in `tokens` mode it is n_image x that mean)."""

    mode: Literal["modality", "tokens"] = "modality"
    text: float = 1.0
    image: float = 1.0
    texture: float = 1.0

    def __post_init__(self) -> None:
        weights = (self.text, self.image, self.texture)
        if not all(math.isfinite(w) for w in weights) or min(weights) < 0:
            raise ValueError(f"train.loss.text, .image and .texture must be finite and >= 0, got {weights}")
        if self.text == self.image == 0:
            raise ValueError("train.loss.text and train.loss.image are both 0: nothing would be learned")


class StageObjective:
    """The loss of one micro-batch: the model's forward ({"loss_text", "loss_image", "n_text", "n_image",
    "image_semantic", "image_texture", ...}) with
    "loss" replaced by the optimised combination of `weights` (`combine`)."""

    name: ClassVar[str]
    PARTS: ClassVar[dict[str, Any]]

    def __init__(self, weights: LossConfig | None = None):
        self.weights = weights or LossConfig()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = model(**{k: batch[k] for k in MODEL_INPUTS})
        return {**out, "loss": combine(out, self.weights)}


def combine(out: dict[str, Tensor], w: LossConfig) -> Tensor:
    """The optimised scalar from the model's per-modality token means and their target counts (see `LossConfig`)."""
    image = w.image * (out["image_semantic"] + w.texture * out["image_texture"])  # a mean over no targets is 0
    text = w.text * out["loss_text"]
    if w.mode == "modality":
        return text + image
    return (text * out["n_text"] + image * out["n_image"]) / (out["n_text"] + out["n_image"]).clamp(min=1)


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
