"""Run every benchmark and save the figures to bench/results/cpu-<date>.json."""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import augment_rate  # noqa: E402
import build_rate  # noqa: E402
import cpu_layout  # noqa: E402
import decode_scales  # noqa: E402
import eval_rate  # noqa: E402
import index_memory  # noqa: E402
import step_time  # noqa: E402
from _inputs import write_results  # noqa: E402


def main() -> None:
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d")}
    results["build"] = build_rate.main()
    results["augment_and_stream"] = augment_rate.main()
    results["decode_scales"] = decode_scales.main()
    results["step_time"] = step_time.main()
    results["cpu_layout"] = cpu_layout.main()
    results["index_memory"] = index_memory.main()
    results["eval_features"] = eval_rate.main()
    out = os.path.join(os.path.dirname(__file__), "results", f"cpu-{results['date']}.json")
    write_results(out, results)


if __name__ == "__main__":
    main()
