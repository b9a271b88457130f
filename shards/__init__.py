"""The shard-set contract shared by the sharding pipeline and the trainer.

A shard set is a prefix holding WebDataset tars, parquet manifests, an index and
a build record (see ``shards.layout``). ``shards.stream`` turns it into an
endless, seeded, resumable stream of samples.
"""

__version__ = "0.1.0"
