"""SwAV pretraining: multi-crop views, wide ResNet-50s, Sinkhorn with a queue, swapped loss, DeepSpeed."""

__version__ = "0.1.0"
