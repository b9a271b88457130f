"""Build the engine with precision=bf16 and write the dtype DeepSpeed will reduce each gradient in."""

import json
import sys

from deepspeed.runtime.torch_autocast import get_comm_dtype

from swav import distributed
from swav.config import load_config
from swav.engine import build_engine, build_model


def main(stage: int, out: str) -> None:
    rank, world, _ = distributed.init()
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "precision=bf16", "model.arch=resnet50w0.0625",
                             "model.hidden_mlp=64", "model.feat_dim=16", "model.num_prototypes=30",
                             "train.batch_size=4"])
    model = build_model(cfg, False, world)
    engine, _ = build_engine(cfg, model, world)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({n: str(get_comm_dtype(p)) for n, p in engine.module.named_parameters()}, f)
    distributed.barrier()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
