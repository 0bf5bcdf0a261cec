"""Evaluation: zero-shot classification, linear probes, image-text retrieval, prompt templates."""
from .linear_probe import linear_probe
from .retrieval import retrieval_metrics
from .templates import COLOR_TEMPLATES, IMAGENET_TEMPLATES, SHAPE_TEMPLATES
from .zeroshot import build_zeroshot_classifier, classify_folder, evaluate_zeroshot, zero_shot_classify

__all__ = ["linear_probe", "retrieval_metrics", "build_zeroshot_classifier", "evaluate_zeroshot",
           "zero_shot_classify", "classify_folder", "IMAGENET_TEMPLATES", "SHAPE_TEMPLATES", "COLOR_TEMPLATES"]
