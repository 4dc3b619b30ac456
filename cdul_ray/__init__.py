"""cdul-ray: CDUL (CLIP-Driven Unsupervised Learning for multi-label image classification, ICCV 2023) on Ray."""

__version__ = "0.1.0"
