"""SwAV pretraining: multi-crop views, wide ResNet-50s, Sinkhorn with a queue, swapped loss, DeepSpeed."""

from swav_io import __version__  # noqa: F401  (one version source: the package metadata)
