"""SwAV steps with the queue in use from step 0, under one ZeRO stage (launched by torchrun).

ZeRO-3 is configured to release every parameter right after its use (max live parameters 0, reuse
distance 0, no persistence): the settings a w5 user lowers to fit memory. Queue scores must then come
from prototypes gathered inside the forward. Writes each step's global loss (rank 0).
"""

import json
import sys

import torch
import torch.nn.functional as F

from swav import distributed
from swav.config import load_config
from swav.engine import build_engine, build_model, set_step_hyperparams
from swav.loss import swav_loss

RELEASE_EAGERLY = {"zero_optimization": {"stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                                         "stage3_param_persistence_threshold": 0}}


def main(stage: int, out: str, steps: int, data_seed: int) -> None:
    rank, world, _ = distributed.init()
    extra = json.dumps(RELEASE_EAGERLY if stage == 3 else {})
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "model.arch=resnet50w0.0625", "model.hidden_mlp=64",
                             "model.feat_dim=16", "model.num_prototypes=[40,24]", "train.batch_size=4",
                             "optim.name=sgd", "optim.base_lr=0.5", f"seed={5 + data_seed}",
                             f"deepspeed.extra={extra}"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, False, world)
    engine, opt = build_engine(cfg, model, world)
    gen = torch.Generator().manual_seed(100 + 1000 * data_seed + rank)
    queue = [F.normalize(torch.randn(32, 16, generator=gen), dim=1) for _ in range(2)]
    losses = []
    for step in range(steps):
        set_step_hyperparams(opt, 0.5, freeze_prototypes=False)
        crops = [torch.randn(2 * 4, 3, 32, 32, generator=gen), torch.randn(2 * 4, 3, 16, 16, generator=gen)]
        emb, scores, queued = engine(crops, queue)
        loss = sum(swav_loss(h, 4, (0, 1), queue_scores=q) for h, q in zip(scores, queued)) / len(scores)
        engine.backward(loss)
        engine.step()
        queue = [torch.cat([emb[4 * i: 4 * (i + 1)].detach(), q[:-4]]) for i, q in enumerate(queue)]
        losses.append(float(distributed.all_reduce_mean(loss.detach())))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(losses, f)
    distributed.barrier()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
