"""anatomask-lab: AnatoMask (ECCV 2024) masked image modelling for 3D medical image segmentation, as a lab kit."""

__version__ = "0.1.0"
