"""Run a few SwAV steps on fixed inputs under one ZeRO stage (launched by torchrun from the tests).

Writes the full model parameters after each step (rank 0) so tests can compare stages,
and checks prototype invariants on every rank's working copy.
"""

import sys

import deepspeed
import torch

from swav import distributed
from swav.config import load_config
from swav.engine import build_engine, build_model, set_step_hyperparams
from swav.loss import swav_loss


def main(stage: int, out: str, steps: int, freeze: int, optim: str, data_seed: int = 0, shape: str = "") -> None:
    rank, world, _ = distributed.init()
    k, d = shape.split(":") if shape else ("[30,20]" if optim == "adamw" else "30", "16")
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "model.arch=resnet50w0.0625", "model.hidden_mlp=64",
                             f"model.feat_dim={d}", f"model.num_prototypes={k}", "train.batch_size=4", f"optim.name={optim}",
                             "optim.base_lr=0.5", "optim.weight_decay=0.01", f"seed={5 + data_seed}"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, False, world)
    engine, opt = build_engine(cfg, model, world)
    gen = torch.Generator().manual_seed(100 + 1000 * data_seed + rank)
    record = []
    for step in range(steps):
        set_step_hyperparams(opt, 0.5, freeze_prototypes=step < freeze)
        crops = [torch.randn(2 * 4, 3, 32, 32, generator=gen), torch.randn(2 * 4, 3, 16, 16, generator=gen)]
        emb, scores = engine(crops)
        heads = scores if isinstance(scores, list) else [scores]
        loss = sum(swav_loss(h, 4, (0, 1)) for h in heads) / len(heads)
        engine.backward(loss)
        engine.step()
        # ZeRO-3 holds a slice of each parameter per rank: gather them (a no-op at the other stages).
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
            for w in engine.module.prototype_weights():
                norms = w.detach().norm(dim=1)
                assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), f"rank {rank} step {step}: rows {norms}"
        record.append({"loss": float(distributed.all_reduce_mean(loss)), "params": params})
    if rank == 0:
        torch.save(record, out)
    distributed.barrier()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "lars",
         int(sys.argv[6]) if len(sys.argv) > 6 else 0, sys.argv[7] if len(sys.argv) > 7 else "")
