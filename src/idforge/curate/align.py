"""Stage 4: canonical crops of one face (ArcFace 112 for identity, FFHQ-style for generation) and its face mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idforge.curate.config import AlignConfig
from idforge.faces import Face
from idforge.faces.align import align_face, alignment_matrix
from idforge.faces.masks import face_mask_in_crop


@dataclass(frozen=True)
class AlignedFace:
    """Attributes:
    crop112: (112, 112, 3) uint8 RGB, ArcFace template, zero border (what the embedder expects).
    crop_ffhq: (S, S, 3) uint8 RGB, FFHQ-style template, S = ``align.ffhq_size``.
    face_mask: (S, S) uint8 {0, 255}, the face region in the FFHQ-style crop (106-point hull, or box ellipse).
    m112, m_ffhq: (2, 3) matrices from decoded-image pixels to each crop.
    """

    crop112: np.ndarray
    crop_ffhq: np.ndarray
    face_mask: np.ndarray
    m112: np.ndarray
    m_ffhq: np.ndarray


def align(rgb: np.ndarray, face: Face, cfg: AlignConfig) -> AlignedFace:
    size = cfg.ffhq_size
    m112 = alignment_matrix(face.kps, 112)
    m_ffhq = alignment_matrix(face.kps, size)
    crop112 = align_face(rgb, face.kps, 112, border="constant")
    crop_ffhq = align_face(rgb, face.kps, size, border=cfg.ffhq_border)
    return AlignedFace(crop112, crop_ffhq, face_mask_in_crop(face, m_ffhq, size), m112, m_ffhq)
