"""What glibc's allocator settings cost and save during a GPTQ run: peak RSS over the loaded model, minor
page faults and CPU time for the first ``--blocks`` blocks of SmolLM2-135M (W4 g64, act-order, 32x512
wiki calibration, one-pass engine), one fresh process per setting.

    .venv/bin/python bench/heap_policy.py   # thresholds 0 (glibc's own), 8 MiB, 1 MiB; one arena; torch's THP

Peak RSS and page faults do not depend on machine load; CPU seconds do, a little (run it quiet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [("glibc defaults", {"CALIBRANT_MMAP_THRESHOLD": "0"}),
            ("one arena, glibc thresholds", {"CALIBRANT_MMAP_THRESHOLD": "0", "BENCH_ARENA_MAX": "1"}),
            ("threshold 8 MiB", {"CALIBRANT_MMAP_THRESHOLD": str(8 << 20)}),
            ("threshold 1 MiB (default)", {"CALIBRANT_MMAP_THRESHOLD": str(1 << 20)}),
            ("threshold 1 MiB, torch huge pages", {"CALIBRANT_MMAP_THRESHOLD": str(1 << 20),
                                                   "THP_MEM_ALLOC_ENABLE": "1"})]


def child(blocks: int) -> dict:
    import ctypes
    import resource
    import threading
    import time

    if os.environ.get("BENCH_ARENA_MAX"):
        ctypes.CDLL("libc.so.6").mallopt(-8, int(os.environ["BENCH_ARENA_MAX"]))  # M_ARENA_MAX

    import calibrant.engine as engine
    from calibrant.api import resolve_calibration
    from calibrant.methods import make_method
    from calibrant.models import load_model

    def rss_mb() -> int:
        with open("/proc/self/status") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("RssAnon", "RssFile"))) // 1024

    lm = load_model("smollm2-135m", quiet=True)
    calib = resolve_calibration("wiki:32x512", lm.tokenizer, 0, None)
    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    time.sleep(0.05)
    base, peak[0] = rss_mb(), 0
    done = [0]
    trim = engine.release_freed_memory

    class Enough(Exception):
        pass

    def counting_trim() -> None:
        trim()
        done[0] += 1
        if done[0] >= blocks:
            raise Enough

    engine.release_freed_memory = counting_trim
    method = make_method("gptq", scheme="w4g64", act_order=True, static_groups=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        engine.compress(lm.model, calib, method, batch_size=8, progress=False)
    except Enough:
        pass
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_over_model_mb": peak[0] - base, "minor_faults": r1.ru_minflt - r0.ru_minflt,
            "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.blocks)))
        return
    print(f"GPTQ W4 g64 act-order, 32x512 wiki, one-pass, first {args.blocks} blocks of smollm2-135m\n")
    print("| allocator setting | peak RSS over the loaded model | minor page faults | CPU s |")
    print("|---|---:|---:|---:|")
    for label, env in SETTINGS:
        done = subprocess.run([sys.executable, __file__, "--child", "--blocks", str(args.blocks)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "THP_MEM_ALLOC_ENABLE": "0", **env}, cwd=ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{label}: the child failed:\n{done.stderr[-2000:]}")
        r = json.loads(line[7:])
        print(f"| {label} | +{r['peak_over_model_mb']} MB | {r['minor_faults']:,} | {r['cpu_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
