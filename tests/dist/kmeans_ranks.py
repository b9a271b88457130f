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
torch.save({"centroids": centroids, "assign": assign, "labels": labels}, f"{sys.argv[1]}/kmeans{rank}.pt")
dist.destroy_process_group()
