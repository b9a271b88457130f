"""A CPU training step with NHWC inputs (what `swav pretrain` feeds on CPU) vs NCHW inputs, same process.

The demo's model and crops (jobs/demo.yaml) through one DeepSpeed ZeRO-0 engine, 1 core, weights left NCHW
as the trainer leaves them on CPU. Only the inputs' memory format differs; the two layouts alternate in blocks
so drift in machine speed hits both. Also prints how far the two layouts' losses are apart on one batch.
"""

from __future__ import annotations

import os
import time

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(steps_per_block: int = 3, blocks: int = 4) -> dict:
    from swav import distributed
    from swav.config import load_config
    from swav.engine import build_engine, build_model, set_step_hyperparams
    from swav.loss import swav_loss

    torch.set_num_threads(1)
    distributed.init()
    torch.manual_seed(0)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "jobs", "demo.yaml"),
                      ["swav.queue_length=0", "deepspeed.zero_stage=0"])
    b = cfg.train.batch_size
    nchw = [torch.randn(n * b, 3, s, s) for s, n in zip(cfg.crops.size_crops, cfg.crops.num_crops)]
    layouts = {"nchw": nchw, "nhwc": [c.contiguous(memory_format=torch.channels_last) for c in nchw]}
    engine, opt = build_engine(cfg, build_model(cfg, False, 1), 1)

    def step(crops: list[torch.Tensor]) -> float:
        set_step_hyperparams(opt, 0.1, False)
        _, scores = engine(crops)
        loss = swav_loss(scores, b, cfg.swav.crops_for_assign)
        engine.backward(loss)
        engine.step()
        return loss.item()

    with torch.no_grad():
        _, s_a = engine(layouts["nchw"])
        _, s_b = engine(layouts["nhwc"])
        loss_gap = abs(float(swav_loss(s_a, b, cfg.swav.crops_for_assign) - swav_loss(s_b, b, cfg.swav.crops_for_assign)))
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
           "ratio_nhwc_vs_nchw": seconds["nchw"] / seconds["nhwc"], "loss_gap_one_batch": loss_gap}
    print(f"CPU train step ({cfg.model.arch}, batch {b}, crops {cfg.crops.num_crops}x{cfg.crops.size_crops}, 1 core): "
          f"NCHW inputs {out['nchw_ms']:.0f} ms | NHWC inputs {out['nhwc_ms']:.0f} ms | speed-up "
          f"{out['ratio_nhwc_vs_nchw']:.2f}x; losses on one batch differ by {loss_gap:.1e}")
    return out


if __name__ == "__main__":
    main()
