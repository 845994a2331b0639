"""Base diffusion models: offline loading (``loading``), tiny random test models (``tiny``), their tokenizer.

Import-light on purpose: torch, diffusers and transformers are imported inside the functions that need them.
"""
