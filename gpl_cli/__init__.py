"""gpl: image embeddings from the final feature maps of CNN backbones, pooled globally."""

__version__ = "0.1.0"
