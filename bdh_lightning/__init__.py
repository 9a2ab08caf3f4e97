"""bdh-lightning: train BDH (Baby Dragon Hatchling) with PyTorch Lightning."""

from .model import BDH, BDHConfig

__all__ = ["BDH", "BDHConfig"]
__version__ = "0.1.0"
