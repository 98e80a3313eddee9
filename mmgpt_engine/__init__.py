"""mmgpt_engine: a kernel-backed training engine for multimodal (image + text) GPT models.

Subpackages: `ops` (the kernel library), `model`, `data`, `train`; `generate` for captioning.
"""
__version__ = "0.1.0"
