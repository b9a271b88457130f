"""The shard-set contract shared by the sharding pipeline and the trainer.

A shard set is a prefix holding WebDataset tars, parquet manifests, an index and
a build record (see ``shards.layout``). ``shards.stream`` turns it into an
endless, seeded, resumable stream of samples.
"""

from swav_io import __version__  # noqa: F401  (one version source: the package metadata)
