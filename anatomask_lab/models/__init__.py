"""Networks: STU-Net (sizes tiny / S / B / L / H), its sparse encoder and the masked-image-modelling model.

* :func:`build_stunet` / :class:`STUNet`: the segmentation network (encoder submodule ``encoder``).
* :func:`build_mim` / :class:`MIMModel`: sparse encoder (backends ``masked`` and ``spconv``) + decoder;
  ``MIMModel.forward(x, mask_bg)`` returns the reconstruction; :func:`mim_loss` gives the loss and the per-patch map.
* :func:`load_encoder_weights`: pretrained encoder weights into an STUNet by key (first conv adapted to the
  input channels).
"""

from .mim import LightDecoder, MIMModel, SimpleDecoder, build_mim, mim_loss
from .sparse import SparseEncoder, masked_instance_norm
from .stunet import (
    SIZES,
    EncoderLoadReport,
    STUNet,
    STUNetEncoder,
    STUNetSpec,
    build_stunet,
    encoder_keys,
    load_encoder_weights,
)

__all__ = [
    "SIZES",
    "EncoderLoadReport",
    "LightDecoder",
    "MIMModel",
    "STUNet",
    "STUNetEncoder",
    "STUNetSpec",
    "SimpleDecoder",
    "SparseEncoder",
    "build_mim",
    "build_stunet",
    "encoder_keys",
    "load_encoder_weights",
    "masked_instance_norm",
    "mim_loss",
]
