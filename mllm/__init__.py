"""SemHiTok-MLLM: an LLM extended with SemHiTok's visual vocabulary for image understanding and generation."""

__version__ = "0.1.0"
