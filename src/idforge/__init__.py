"""idforge: identity-preserving text-to-image, from raw photos to registered models.

Importing the package is cheap on purpose; heavy libraries (torch, diffusers, insightface, mlflow, ray, kfp)
are imported inside the functions that need them.
"""

__version__ = "0.1.0"
