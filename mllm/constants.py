"""Constants of the MLLM's text side, owned here at the bottom layer: every other `mllm` module may import them, and
this module imports no `mllm` module.

    IGNORE_INDEX       label of a token nothing is learned on (`torch.nn.functional.cross_entropy`'s default)
    IMAGE_PLACEHOLDER  the LLaVA placeholder one image's `<boi> ids <eoi>` replace
    ROLES              LLaVA's turn roles (human, gpt), alternating, human first
    GENERATION_PROMPT  (choice) the chat user turn of text-to-image; caption "" = the unconditional prompt
    EXPANSION_PROMPT   (choice) the user turn asking for a caption's detailed scene description (prompt expansion)
    Box                an object's box (x0, y0, x1, y1), normalised to [0, 1] of the image
"""

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")
GENERATION_PROMPT = "Generate an image of: {caption}"
EXPANSION_PROMPT = "Describe in detail an image of: {caption}"
Box = tuple[float, float, float, float]
