"""Each of 2 gloo ranks runs spherical k-means, and the bank equipartition, on its part of the rows (launched
by torchrun from the tests)."""

import sys

import torch
import torch.distributed as dist

from swav.clustering import MemoryBank, equipartition, spherical_kmeans

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
# Each rank's bank holds its own samples (rank 0: ids 0-9, rank 1: ids 100-104), 2 heads; each rank asks for
# ids of both banks and of neither.
bank = MemoryBank(size=16, views=1, dim=2, heads=2)
mine_ids = torch.arange(10) if rank == 0 else torch.arange(100, 105)
bank.add(mine_ids, torch.ones(mine_ids.numel(), 1, 2))
bank.assignments[:, bank.ids >= 0] = torch.stack([bank.ids[bank.ids >= 0] % 7, bank.ids[bank.ids >= 0] % 5])
asked = torch.tensor([0, 100, 5, 7777]) if rank == 0 else torch.tensor([104, 3, 9999, 9])
everywhere, world_ids = bank.lookup_everywhere(asked)
torch.save({"centroids": centroids, "assign": assign, "labels": labels, "alone": alone, "alone_labels": alone_labels,
            "everywhere": everywhere, "own": bank.lookup(asked), "world_ids": world_ids},
           f"{sys.argv[1]}/kmeans{rank}.pt")
dist.destroy_process_group()
