"""The CDUL math as pure torch/numpy functions (no Ray import anywhere in this package).

Shapes: N images, C classes, S = K*K snippets per image, D embedding size.
"""

from cdul_ray.core.aggregate import AGGREGATORS, aggregate, initial_soft_label, snippet_stats
from cdul_ray.core.alignment import alignment_scores, class_text_embeddings, snippet_boxes
from cdul_ray.core.metrics import MAPResult, mean_average_precision, multi_hot

__all__ = [
    "AGGREGATORS",
    "MAPResult",
    "aggregate",
    "alignment_scores",
    "class_text_embeddings",
    "initial_soft_label",
    "mean_average_precision",
    "multi_hot",
    "snippet_boxes",
    "snippet_stats",
]
