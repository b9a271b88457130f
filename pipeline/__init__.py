"""The sharding stage: bucket of raw images -> validated, normalised shard set."""
