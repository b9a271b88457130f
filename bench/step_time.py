"""Step time of the DeepSpeed engine (ZeRO-0, as `swav pretrain` runs it) vs a plain PyTorch loop, same process.

Same model, batch, crops, loss and LARS optimizer; data is pre-made so only the step is timed; the two
loops alternate in blocks so drift in machine speed hits both. Target: ratio <= 1.10.
"""

from __future__ import annotations

import copy
import os
import time

from _inputs import demo_step_inputs

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(steps_per_block: int = 5, blocks: int = 4) -> dict:
    from swav import distributed
    from swav.engine import build_engine, build_model, set_step_hyperparams
    from swav.loss import swav_loss
    from swav.optim import build_optimizer

    distributed.init()
    cfg, crops = demo_step_inputs()
    b = cfg.train.batch_size
    plain_model = build_model(cfg, False, 1)
    ds_model = copy.deepcopy(plain_model)
    plain_opt = build_optimizer(plain_model, cfg)
    engine, ds_opt = build_engine(cfg, ds_model, 1)

    def plain_step():
        set_step_hyperparams(plain_opt, 0.1, False)
        _, scores = plain_model(crops)
        loss = swav_loss(scores, b, cfg.swav.crops_for_assign)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def ds_step():
        set_step_hyperparams(ds_opt, 0.1, False)
        _, scores = engine(crops)
        loss = swav_loss(scores, b, cfg.swav.crops_for_assign)
        engine.backward(loss)
        engine.step()

    for f in (plain_step, ds_step):  # warm-up
        f()
    times = {"plain": 0.0, "deepspeed": 0.0}
    for _ in range(blocks):
        for name, f in (("plain", plain_step), ("deepspeed", ds_step)):
            t0 = time.perf_counter()
            for _ in range(steps_per_block):
                f()
            times[name] += time.perf_counter() - t0
    n = steps_per_block * blocks
    plain, ds = times["plain"] / n, times["deepspeed"] / n
    print(f"train step ({cfg.model.arch}, batch {b}, crops {cfg.crops.num_crops}x{cfg.crops.size_crops}, CPU): "
          f"plain PyTorch {1000 * plain:.0f} ms | DeepSpeed ZeRO-0 {1000 * ds:.0f} ms | ratio {ds / plain:.3f} "
          "(target <= 1.10)")
    return {"plain_ms": 1000 * plain, "deepspeed_ms": 1000 * ds, "ratio": ds / plain}


if __name__ == "__main__":
    main()
