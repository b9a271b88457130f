"""Load a ZeRO-1 checkpoint saved by another world size (launched by torchrun from the tests) and compare
this rank's optimizer slice with the consolidated one read straight from the checkpoint's files."""

import json
import os
import sys

import torch

from swav import checkpoint as ckpt
from swav import distributed
from swav.config import load_config
from swav.engine import build_engine, build_model
from swav.objective import build_objective
from swav.train import _resume


def main(ckpt_dir: str, out: str, *overrides: str) -> None:
    rank, world, _ = distributed.init()
    cfg = load_config("jobs/tiny.yaml", list(overrides))
    torch.manual_seed(123)   # another init than the checkpoint's: only a real load makes them equal
    engine, _ = build_engine(cfg, build_model(cfg, False, world), world)
    objective = build_objective(cfg, cfg.train.batch_size, world, torch.device("cpu"))
    stage = os.path.join(os.path.dirname(out), "stage")
    step, *_ = _resume(cfg, engine, objective, ckpt.CheckpointStore(ckpt_dir), stage, rank, world)

    store = ckpt.CheckpointStore(ckpt_dir)
    ref = store.latest()
    tagdir = os.path.join(ckpt_dir, ref.tag)
    saved = torch.load(os.path.join(tagdir, "rank00000/ds/mp_rank_00_model_states.pt"), weights_only=False)["module"]
    zopt = engine.optimizer
    result = {"rank": rank, "step": step, "groups": [], "module_equal": all(
        torch.equal(v, saved[k]) for k, v in engine.module.state_dict().items())}
    sizes = ref.manifest["zero_partition_sizes"]
    for gi, flat in enumerate(zopt.single_partition_of_fp32_groups):
        # consolidated momentum of the group: every old partition in order, each cut to its share
        parts = []
        for i in range(ref.world_size):
            sd = torch.load(os.path.join(tagdir, f"rank{i:05d}/ds/zero_pp_rank_{i}_mp_rank_00_optim_states.pt"),
                            weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
            parts.append(sd["state"][gi]["momentum_buffer"][:sizes[gi]])
        whole = torch.cat(parts)
        p = zopt.partition_size[gi]
        numel = zopt.round_robin_bit16_offsets[gi][-1] + zopt.round_robin_bit16_groups[gi][-1].numel()
        lo, hi = rank * p, min((rank + 1) * p, numel)
        mom = zopt.optimizer.state[flat].get("momentum_buffer")
        weights = zopt.bit16_groups_flat[gi][lo:hi]
        result["groups"].append({
            "numel": hi - lo, "momentum_nonzero": bool(whole[lo:hi].abs().sum() > 0),
            "momentum_equal": mom is not None and torch.equal(mom[:hi - lo], whole[lo:hi]),
            "weights_equal": torch.equal(flat[:hi - lo], weights)})
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
