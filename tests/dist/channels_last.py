"""channels_last through deepspeed.initialize at one ZeRO stage (launched by torchrun from the tests):
the engine builds, the weights end as apply_channels_last reports, and two steps on NHWC inputs update
NHWC weights as they update the default-layout ones."""

import json
import sys

import torch

from swav import distributed
from swav.config import load_config
from swav.engine import apply_channels_last, build_engine, build_model, set_step_hyperparams
from swav.loss import swav_loss


def run(stage: int, nhwc: bool) -> dict:
    """Two steps on NHWC inputs; with nhwc, the weights are made channels_last too where DeepSpeed allows."""
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "model.arch=resnet50w0.0625", "model.hidden_mlp=64",
                             "model.feat_dim=16", "model.num_prototypes=20", "train.batch_size=4", "seed=5"])
    torch.manual_seed(cfg.seed)
    engine, opt = build_engine(cfg, build_model(cfg, False, 1), 1)
    convs, cl = apply_channels_last(engine) if nhwc else (0, 0)
    init = engine.module.trunk.conv1.weight.detach().clone()
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        set_step_hyperparams(opt, 0.1, freeze_prototypes=False)
        crops = [torch.randn(8, 3, 32, 32, generator=gen), torch.randn(8, 3, 16, 16, generator=gen)]
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        _, scores = engine(crops)
        engine.backward(swav_loss(scores, 4, (0, 1)))
        engine.step()
    first = engine.module.trunk.conv1.weight
    return {"convs": convs, "nhwc": cl, "moved": bool((first.detach() - init).abs().max() > 1e-4), "still_nhwc": bool(first.is_contiguous(memory_format=torch.channels_last)
                                                            and not first.is_contiguous()),
            "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}


if __name__ == "__main__":
    distributed.init()
    stage = int(sys.argv[1])
    a, b = run(stage, True), run(stage, False)
    worst = max(((a["params"][k].float() - b["params"][k].float()).abs().max() /
                 b["params"][k].float().abs().max().clamp_min(1e-12)).item() for k in b["params"])
    with open(sys.argv[2], "w") as f:
        json.dump({"convs": a["convs"], "nhwc": a["nhwc"], "still_nhwc": a["still_nhwc"], "moved": a["moved"],
                   "worst_rel": worst}, f)
