"""What writing compressed weights back costs when the model is a copy-on-write mapping of its file.

    .venv/bin/python bench/weight_writes.py          # SmolLM2-135M: every decoder linear, as a compression does

transformers maps a float32 safetensors file privately: reading a weight maps the page cache, and the
first write to each 4 KiB page faults and copies it. This loads the model twice (each load is a new
mapping), runs one forward so every page is mapped as it is during a compression, and writes every
decoder linear's weight back: once page by page (plain faults), once after
``calibrant.heap.prefault_for_write`` (one ``madvise(MADV_POPULATE_WRITE)`` per tensor, as the engine
now does). Prints the seconds and minor page faults of each.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()

    from calibrant.heap import prefault_for_write
    from calibrant.models import load_model
    from calibrant.models.adapter import Adapter, set_weight, weight_of

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    rows = []
    for label, prefault in (("plain faults", False), ("prefault_for_write, then write", True)):
        lm = load_model(args.model, quiet=True)
        with torch.no_grad():
            lm.model.model(input_ids=torch.arange(64)[None])  # map every decoder page, as the forward does
        adapter = Adapter(lm.model)
        linears = [m for i in range(len(adapter.blocks)) for m in adapter.block_linears(i).values()]
        new = [weight_of(m).clone() for m in linears]
        f0, t0 = faults(), time.perf_counter()
        if prefault:
            prefault_for_write([weight_of(m) for m in linears])
        for m, w in zip(linears, new, strict=True):
            set_weight(m, w)
        rows.append((label, time.perf_counter() - t0, faults() - f0))
        size = sum(w.numel() * w.element_size() for w in new)
        del lm, adapter, linears, new

    print(f"{args.model}: {size / 1e6:.0f} MB of decoder linear weights written back once\n")
    print("| write-back | s | minor page faults |")
    print("|---|---:|---:|")
    for label, seconds, n in rows:
        print(f"| {label} | {seconds:.2f} | {n:,} |")


if __name__ == "__main__":
    main()
