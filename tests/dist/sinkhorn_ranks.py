"""Each of 2 gloo ranks runs Sinkhorn on its half of a batch (launched by torchrun from the tests)."""

import sys

import torch
import torch.distributed as dist

from swav.sinkhorn import sinkhorn

dist.init_process_group("gloo")
rank = dist.get_rank()
scores = torch.load(f"{sys.argv[1]}/scores.pt")
half = scores.shape[0] // 2
torch.save(sinkhorn(scores[rank * half:(rank + 1) * half]), f"{sys.argv[1]}/q{rank}.pt")
dist.destroy_process_group()
