"""Models: two-tower image-text models of two families (`build_model` picks by
config.model.family): this project's FlexiViT + text transformer (`TwoTower`), and
SigLIP's towers as its public checkpoints have them (`SiglipTwoTower`)."""

from jest_pod.models.siglip import SiglipTwoTower
from jest_pod.models.two_tower import TwoTower, build_model

__all__ = ["SiglipTwoTower", "TwoTower", "build_model"]
