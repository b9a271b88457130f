"""A CPU training step with NHWC inputs (what `swav pretrain` feeds on CPU) vs NCHW inputs, same process.

The demo's model and crops (jobs/demo.yaml) through one DeepSpeed ZeRO-0 engine, 1 core, weights NCHW.
Only the inputs' memory format differs; the two layouts alternate in blocks so drift in machine speed hits
both. It also prints each layout's error against float64 on one forward and backward of the same model
and batch: NHWC rounds coarser, the price of the speed-up (README, "Performance").
"""

from __future__ import annotations

import copy
import os
import time

import torch
from _inputs import demo_step_inputs

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _errors_vs_float64(model: torch.nn.Module, crops: list[torch.Tensor]) -> dict:
    """Relative error of the embeddings (max) and of the parameter gradients (median over tensors)."""
    runs = {}
    for name, dtype, nhwc in (("f64", torch.float64, False), ("nchw", torch.float32, False),
                              ("nhwc", torch.float32, True)):
        m = copy.deepcopy(model).to(dtype)
        x = [c.to(dtype) for c in crops]
        x = [c.contiguous(memory_format=torch.channels_last) for c in x] if nhwc else x
        emb, scores = m(x)
        (emb.pow(2).sum() + scores.pow(2).sum()).backward()
        runs[name] = (emb.detach().double(), [p.grad.double() for p in m.parameters() if p.grad is not None])
    ref_emb, ref_grads = runs["f64"]
    out = {}
    for name in ("nchw", "nhwc"):
        emb, grads = runs[name]
        rel = sorted(((g - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(grads, ref_grads))
        out[name] = {"embedding": ((emb - ref_emb).abs().max() / ref_emb.abs().max()).item(),
                     "gradient_median": rel[len(rel) // 2]}
    return out


def main(steps_per_block: int = 3, blocks: int = 4) -> dict:
    from swav import distributed
    from swav.engine import build_engine, build_model, set_step_hyperparams
    from swav.loss import swav_loss

    torch.set_num_threads(1)
    distributed.init()
    cfg, nchw = demo_step_inputs(torch.rand)
    b = cfg.train.batch_size
    layouts = {"nchw": nchw, "nhwc": [c.contiguous(memory_format=torch.channels_last) for c in nchw]}
    model = build_model(cfg, False, 1)
    errors = _errors_vs_float64(model, nchw)
    engine, opt = build_engine(cfg, model, 1)

    def step(crops: list[torch.Tensor]) -> float:
        set_step_hyperparams(opt, 0.1, False)
        _, scores = engine(crops)
        loss = swav_loss(scores, b, cfg.swav.crops_for_assign)
        engine.backward(loss)
        engine.step()
        return loss.item()

    for crops in layouts.values():  # warm-up: first-call kernel selection
        step(crops)
    seconds = {name: 0.0 for name in layouts}
    for _ in range(blocks):
        for name, crops in layouts.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_block):
                step(crops)
            seconds[name] += time.perf_counter() - t0
    n = steps_per_block * blocks
    out = {"nchw_ms": 1000 * seconds["nchw"] / n, "nhwc_ms": 1000 * seconds["nhwc"] / n,
           "ratio_nhwc_vs_nchw": seconds["nchw"] / seconds["nhwc"], "error_vs_float64": errors}
    print(f"CPU train step ({cfg.model.arch}, batch {b}, crops {cfg.crops.num_crops}x{cfg.crops.size_crops}, 1 core): "
          f"NCHW inputs {out['nchw_ms']:.0f} ms | NHWC inputs {out['nhwc_ms']:.0f} ms | speed-up "
          f"{out['ratio_nhwc_vs_nchw']:.2f}x")
    for name, e in errors.items():
        print(f"  {name.upper()} vs float64, one forward+backward at init: embeddings {e['embedding']:.1e}, "
              f"gradients {e['gradient_median']:.1e} (median relative)")
    return out


if __name__ == "__main__":
    main()
