"""Models: a FlexiViT image tower and a transformer text tower, joined as a two-tower model."""

from jest_pod.models.two_tower import TwoTower, build_model

__all__ = ["TwoTower", "build_model"]
