"""channels_last through deepspeed.initialize at one ZeRO stage (launched by torchrun from the tests):
the engine builds, the weights end as apply_channels_last reports, two steps on NHWC inputs update NHWC
weights as they update the default-layout ones, and NHWC inputs (what the trainer feeds on CPU) compute
the same first embeddings as NCHW inputs, to rounding."""

import json
import sys

import torch

from swav import distributed
from swav.config import load_config
from swav.engine import apply_channels_last, build_engine, build_model, set_step_hyperparams
from swav.loss import swav_loss


def run(stage: int, nhwc: bool, nhwc_inputs: bool = True) -> dict:
    """Two steps; with nhwc, the weights are made channels_last too where DeepSpeed allows."""
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "model.arch=resnet50w0.0625", "model.hidden_mlp=64",
                             "model.feat_dim=16", "model.num_prototypes=20", "train.batch_size=4", "seed=5"])
    torch.manual_seed(cfg.seed)
    engine, opt = build_engine(cfg, build_model(cfg, False, 1), 1)
    convs, cl = apply_channels_last(engine) if nhwc else (0, 0)
    init = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    emb0 = None
    for _ in range(2):
        set_step_hyperparams(opt, 0.1, freeze_prototypes=False)
        crops = [torch.randn(8, 3, 32, 32, generator=gen), torch.randn(8, 3, 16, 16, generator=gen)]
        if nhwc_inputs:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        emb, scores = engine(crops)
        emb0 = emb.detach().clone() if emb0 is None else emb0
        engine.backward(swav_loss(scores, 4, (0, 1)))
        engine.step()
    first = engine.module.trunk.conv1.weight
    # A parameter an update missed stays exactly at init; every one moved by 2.3e-5 or more (measured).
    least = min((v.detach() - init[k]).abs().max().item() for k, v in engine.module.named_parameters())
    return {"convs": convs, "nhwc": cl, "moved": least > 1e-6,
            "still_nhwc": bool(first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()),
            "emb0": emb0, "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}


if __name__ == "__main__":
    distributed.init()
    stage = int(sys.argv[1])
    a, b, c = run(stage, True), run(stage, False), run(stage, False, nhwc_inputs=False)

    def worst(x: dict, y: dict) -> float:
        return max(((x["params"][k].float() - y["params"][k].float()).abs().max() /
                    y["params"][k].float().abs().max().clamp_min(1e-12)).item() for k in y["params"])

    with open(sys.argv[2], "w") as f:
        json.dump({"convs": a["convs"], "nhwc": a["nhwc"], "still_nhwc": a["still_nhwc"], "moved": a["moved"],
                   "worst_rel": worst(a, b),
                   "emb_rel_inputs": ((b["emb0"] - c["emb0"]).abs().max() / c["emb0"].abs().max()).item()}, f)
