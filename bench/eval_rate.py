"""Feature extraction for `swav eval` on 1 core: NHWC (what `extract` runs) vs NCHW, same process.

The demo's trunk (resnet50w0.125) on 64-px digits, batches of 64, the two layouts alternating in blocks so
drift in machine speed hits both. Also prints how far the features of the two layouts are apart.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F


def main(blocks: int = 4, batches_per_block: int = 4) -> dict:
    from sklearn.datasets import load_digits

    from swav.models import build_trunk

    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = torch.from_numpy(load_digits().images[:64].astype(np.float32) / 16.0)
    x = F.interpolate(digits[:, None], size=64, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    trunk = build_trunk("resnet50w0.125").eval()
    nhwc_trunk = copy.deepcopy(trunk).to(memory_format=torch.channels_last)
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    seconds = {"nchw": 0.0, "nhwc": 0.0}
    with torch.no_grad():
        for _name, m, inp in (("nchw", trunk, x), ("nhwc", nhwc_trunk, x_nhwc)):
            m(inp)  # warm-up: first-call kernel selection
        for _ in range(blocks):
            for name, m, inp in (("nchw", trunk, x), ("nhwc", nhwc_trunk, x_nhwc)):
                t0 = time.perf_counter()
                for _ in range(batches_per_block):
                    m(inp)
                seconds[name] += time.perf_counter() - t0
        a, b = F.normalize(trunk(x), dim=1), F.normalize(nhwc_trunk(x_nhwc), dim=1)
    n = blocks * batches_per_block * x.shape[0]
    out = {"nchw_images_per_s": n / seconds["nchw"], "nhwc_images_per_s": n / seconds["nhwc"],
           "ratio_nhwc_vs_nchw": seconds["nchw"] / seconds["nhwc"],
           "max_abs_feature_difference": float((a - b).abs().max())}
    print(f"eval features, 1 core: NCHW {out['nchw_images_per_s']:.0f} img/s, NHWC {out['nhwc_images_per_s']:.0f} "
          f"img/s, ratio {out['ratio_nhwc_vs_nchw']:.2f}x; features differ by at most "
          f"{out['max_abs_feature_difference']:.1e}")
    return out


if __name__ == "__main__":
    main()
