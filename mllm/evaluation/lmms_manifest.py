"""lmms-eval's model registration for this project: the entry point `semhitok` of the group `lmms_eval.models`
(pyproject.toml) names this module, which lmms-eval imports whenever it builds its model registry. It only imports
the manifest type; the model class (mllm/evaluation/lmms_model.py, torch, the checkpoint) loads when lmms-eval asks
for it."""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "semhitok"


def manifests() -> list[ModelManifest]:
    """The models this project registers with lmms-eval."""
    return [ModelManifest(model_id=MODEL_ID, simple_class_path="mllm.evaluation.lmms_model.SemHiTokLMMS")]
