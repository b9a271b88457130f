"""Each of 2 gloo ranks runs spherical k-means, and the bank equipartition, on its part of the rows (launched
by torchrun from the tests)."""

import sys

import torch
import torch.distributed as dist

from swav.clustering import equipartition, spherical_kmeans

dist.init_process_group("gloo")
rank = dist.get_rank()
data = torch.load(f"{sys.argv[1]}/kmeans.pt")
x = data["x"][data["split"][rank]:data["split"][rank + 1]]
centroids, assign = spherical_kmeans(x, data["init"], 5, all_reduce=dist.all_reduce)
labels = equipartition(x @ data["init"].t(), epsilon=0.05, iterations=30)
# Rank 1 with an empty bank (a rank new to the world): it still takes part in every all-reduce.
mine = data["x"] if rank == 0 else data["x"][:0]
alone, _ = spherical_kmeans(mine, data["init"], 5, all_reduce=dist.all_reduce)
alone_labels = equipartition(mine @ data["init"].t(), epsilon=0.05, iterations=30)
torch.save({"centroids": centroids, "assign": assign, "labels": labels, "alone": alone, "alone_labels": alone_labels},
           f"{sys.argv[1]}/kmeans{rank}.pt")
dist.destroy_process_group()
