"""COCO images with captions and object names, from an `annotations.jsonl` such as ../shared/data/real/coco-491.

Each line: {"image": "images/000000000009.jpg", "coco_id": 9, "captions": [...], "objects": [...]};
`captions` and `objects` may be empty lists.
"""

from __future__ import annotations

import os

from semhitok.runtime import DEFAULT_MAX_PIXELS, JsonlImageDataset


class CocoDataset(JsonlImageDataset):
    """Items: {"image": (3, size, size) float32 in [-1, 1], "path": str, "coco_id": int,
    "captions": list[str], "objects": list[str] (COCO category names)}, or a `semhitok.runtime.BadItem`.

    Image paths are relative to the folder of `annotations`. `require_captions` / `require_objects` keep only the
    images that have at least one.
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        size: int | None,
        *,
        require_captions: bool = False,
        require_objects: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        def keep(rec: dict) -> bool:
            return (bool(rec["captions"]) or not require_captions) and (bool(rec["objects"]) or not require_objects)

        super().__init__(
            annotations,
            size,
            image_key="image",
            text_keys=("coco_id", "captions", "objects"),
            keep=keep,
            max_pixels=max_pixels,
        )
