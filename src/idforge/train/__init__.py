"""Training: the ``prepare`` cache, datasets over it, and the Ray Train loop for population methods.

Import-light: the heavy modules (``prepare``, ``dataset``, ``population``) import torch/diffusers/Ray themselves.
"""
