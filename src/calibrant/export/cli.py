"""``calibrant calib imatrix`` (llama.cpp importance matrices) and ``calibrant export`` (an existing output to
another format): parsers and commands, thin over the API."""

from __future__ import annotations

import argparse
from typing import Any

from calibrant.argtypes import add_chat_template_option, positive_int
from calibrant.tables import table


def cmd_calib_imatrix(args: argparse.Namespace) -> int:
    from calibrant.api import compute_imatrix
    from calibrant.export.imatrix import check_imatrix_output

    check_imatrix_output(args.out, args.overwrite)
    imatrix = compute_imatrix(args.model, args.spec, out=args.out, seed=args.seed, overwrite=args.overwrite,
                              batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                              chat_template=args.chat_template)
    calib = imatrix.provenance.get("calibration", {})
    means = [float(imatrix.mean(n).mean()) for n in sorted(imatrix.sums)]
    row = {"entries": len(imatrix.sums), "windows": imatrix.chunk_count, "tokens per window": imatrix.chunk_size,
           "mean x² (min..max over weights)": f"{min(means):.4g}..{max(means):.4g}"}
    print(table([list(row.values())], list(row)))
    print(f"calibration {calib.get('spec', calib.get('source'))} seed {calib.get('seed')} hash {calib.get('hash')}")
    suffix = "" if str(args.out).endswith(".gguf") else f" (provenance in {args.out}.json)"
    print(f"saved: {args.out}{suffix} — use it with llama-quantize --imatrix {args.out}")
    return 0


def add_imatrix_parser(csub: argparse._SubParsersAction) -> None:
    ci = csub.add_parser("imatrix", help="llama.cpp importance matrix (llama-quantize --imatrix) from a calibration set")
    ci.add_argument("spec", help="a calibration spec (e.g. wiki:128x512, mix of sources, self:...) or a saved set "
                                 "(*.safetensors)")
    ci.add_argument("--model", default="smollm2-135m", help="the dense model the matrix is measured on")
    ci.add_argument("--out", required=True, help="*.gguf (llama.cpp's current format, provenance inside) or *.dat "
                                                 "(legacy format, provenance in <out>.json)")
    ci.add_argument("--seed", type=int, default=0)
    ci.add_argument("--batch-size", type=positive_int, default=8)
    ci.add_argument("--device", default=None, help="cpu (default) or cuda")
    ci.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_chat_template_option(ci)
    ci.add_argument("--quiet", action="store_true")
    ci.set_defaults(func=cmd_calib_imatrix)


def print_gguf_fallbacks(export: dict[str, Any]) -> None:
    """Every tensor a GGUF export did not write in the file's quantized type, and why (1-D ones counted)."""
    if export.get("format") != "gguf":
        return
    rows = export.get("tensors", [])
    flat = [r for r in rows if len(r["shape"]) == 1]
    for r in rows:
        if len(r["shape"]) > 1 and not r["why"].startswith("quantized"):
            print(f"gguf: {r['tensor']} {'x'.join(map(str, r['shape']))} written {r['type']} ({r['why']})")
    if flat:
        print(f"gguf: {len(flat)} 1-D tensors (norms, biases) written F32; file type {export.get('file_type')}, "
              f"metadata from the {export.get('metadata_from')}")


def cmd_export(args: argparse.Namespace) -> int:
    from calibrant.api import export_model

    out, summary = export_model(args.model_dir, args.out, export_format=args.export_format, gguf_type=args.gguf_type,
                                overwrite=args.overwrite, progress=not args.quiet)
    types: dict[str, int] = {}
    for row in summary["tensors"]:
        types[row["type"]] = types.get(row["type"], 0) + 1
    print(f"tensors: {', '.join(f'{n} {t}' for t, n in sorted(types.items()))}")
    print_gguf_fallbacks(summary)
    print(f"saved: {out}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="write a compressed output directory in another format (GGUF for llama.cpp)")
    ex.add_argument("model_dir", help="the --out directory of 'calibrant compress'")
    ex.add_argument("--format", dest="export_format", default="gguf", help="gguf (one .gguf file for llama.cpp)")
    ex.add_argument("--gguf-type", default=None, help="the file's type; must be the grid the weights lie on "
                                                      "(default: that grid, or f16 when nothing is quantized)")
    ex.add_argument("--out", required=True, help="the .gguf file to write")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ex.add_argument("--quiet", action="store_true")
    ex.set_defaults(func=cmd_export)
