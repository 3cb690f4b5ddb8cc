"""``calibrant`` command line: parses, calls the Python API, prints tables. Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import typing
from pathlib import Path
from typing import Any

import yaml

from calibrant.argtypes import add_chat_template_option, byte_size, positive_int
from calibrant.errors import CalibrantError, disk_full
from calibrant.tables import table

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with calibrant's error format: one line and a pointer to --help, not the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER_ERROR, f"calibrant: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _heldout_names(value: str | None) -> list[str] | None:
    """Comma-separated held-out corpora, each name checked before any model is loaded."""
    from calibrant.calibration import check_heldout_name

    names = _csv(value)
    for name in names or []:
        check_heldout_name(name)
    return names


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One option per parameter of any registered method, derived from the methods' signatures (so a new
    method with a new parameter needs no CLI code), plus ``--param key=value`` for anything else."""
    from calibrant.methods import METHODS, parameters

    seen: dict[str, list[str]] = {}
    kinds: dict[str, Any] = {}
    helps: dict[str, list[str]] = {}
    for name, cls in METHODS.items():
        hints = typing.get_type_hints(cls.__init__)
        for key, param in parameters(cls).items():
            seen.setdefault(key, []).append(name)
            kinds.setdefault(key, _option_type(hints.get(key), param.default))
            text = cls.param_help.get(key)
            if text and text not in helps.setdefault(key, []):
                helps[key].append(text)
    group = parser.add_argument_group("method parameters (from each method's signature; each goes to the methods "
                                      "of the recipe that take it)")
    for key, methods in seen.items():
        what = "; ".join(helps.get(key, [])) or key.replace("_", " ")
        text = f"{what} [{', '.join(methods)}]"
        flag = f"--{key.replace('_', '-')}"
        if kinds[key] is bool:
            group.add_argument(flag, dest=f"method_{key}", action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            group.add_argument(flag, dest=f"method_{key}", type=kinds[key], default=None, metavar=key.upper(),
                               help=text)
    group.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="any other method parameter (repeatable), e.g. --param damp=0.05")


def _option_type(hint: Any, default: Any) -> Any:
    """``float | None`` → float; ``bool`` → bool; unannotated: the default's type (str when None)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    kind = args[0] if args and isinstance(args[0], type) else type(default) if default is not None else str
    return kind if kind in (bool, int, float, str) else str


def _method_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {k.removeprefix("method_"): v for k, v in vars(args).items() if k.startswith("method_") and v is not None}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CalibrantError(f"--param {item!r} is not KEY=VALUE; write it like --param damp=0.05")
        params[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return params


def cmd_compress(args: argparse.Namespace) -> int:
    from calibrant.api import compress_model, evaluate_perplexity

    eval_corpora = _heldout_names(args.eval)
    params = _method_params(args)
    result = compress_model(
        args.model, args.method, sparsity=params.pop("sparsity", None), pattern=params.pop("pattern", None),
        calibration=args.calibration,
        seed=args.seed, out=args.out, overwrite=args.overwrite, batch_size=args.batch_size,
        propagate=args.propagate, pipeline=args.pipeline, include=_csv(args.include), exclude=_csv(args.exclude), device=args.device,
        progress=not args.quiet, export_format=args.export_format, gguf_type=args.gguf_type,
        chat_template=args.chat_template, stream=args.stream, max_activation_memory=args.max_activation_memory,
        **params,
    )
    rep = result.report
    t = rep.timings
    bits = f", {rep.effective_bits:.3f} effective bits/weight" if rep.effective_bits is not None else ""
    print(f"{'+'.join(r['method'] for r in rep.recipe)}: {len(rep.layers)} linear layers, "
          f"overall sparsity {rep.sparsity:.4f}{bits}")
    extra = "".join(f" + {label} {t[key]:.1f}s" for key, label in (("plan_s", "plan"), ("block_s", "block methods"))
                    if t.get(key))
    print(f"time: total {t.get('total_s', 0):.1f}s = capture {t.get('capture_s', 0):.1f}s + block forwards "
          f"{t.get('forward_s', 0):.1f}s + statistics {t.get('stats_s', 0):.1f}s + method {t.get('compress_s', 0):.1f}s"
          f"{extra}; pipeline: {rep.pipeline}")
    if args.export_format != "gguf":  # a GGUF export lists them with the type they were written in
        for name, why in rep.fallbacks.items():
            print(f"left unquantized: {name} ({why})")
    if result.calibration is not None:
        print(f"calibration: {result.calibration.provenance.get('source')} "
              f"{result.calibration.n}x{result.calibration.seq_len} seed={result.calibration.provenance.get('seed')} "
              f"hash={result.calibration.hash}")
    streamed = result.metadata.get("streamed")
    if streamed:
        print(f"streamed: {streamed['dtype']} weights, at most {streamed['peak_resident_blocks']} block(s) in memory "
              f"at once; read {t.get('read_s', 0):.1f}s, written {t.get('write_s', 0):.1f}s")
    if args.eval:
        ppl = evaluate_perplexity(result.out if streamed else result.loaded, eval_corpora,
                                  max_tokens=args.max_eval_tokens, progress=not args.quiet,
                                  stream=True if streamed else None)
        for name, r in ppl.items():
            print(f"perplexity {name} (held-out, {r.tokens} tokens, seq_len {r.protocol['seq_len']}): {r.ppl:.3f}")
    if result.out is not None:
        from calibrant.export.cli import print_gguf_fallbacks

        print_gguf_fallbacks(result.metadata.get("export") or {})
        print(f"saved: {result.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from calibrant.api import as_loaded, decide_streaming, evaluate_perplexity, evaluate_zeroshot
    from calibrant.evaluate.zeroshot import check_tasks

    corpora, tasks = _heldout_names(args.ppl), _csv(args.tasks)
    if not corpora and not tasks:
        raise CalibrantError("nothing to evaluate: pass --ppl CORPORA (e.g. wiki,news) and/or --tasks TASKS "
                             "(e.g. arc_easy,piqa)")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise CalibrantError(f"--max-tokens must be positive, got {args.max_tokens}")
    if corpora and args.stride is not None and args.stride > args.seq_len:
        raise CalibrantError(f"--stride {args.stride} is longer than --seq-len {args.seq_len}: tokens between windows "
                             f"would never be scored; pass --stride {args.seq_len} or less")
    if args.json:
        from calibrant.export.hf import check_output_file

        check_output_file(args.json, "--json", "results.json")
    hub = True if args.hub else None
    if tasks:  # refuse bad task names and options before loading the model
        check_tasks(tasks, limit=args.limit, num_fewshot=args.fewshot, batch_size=args.batch_size, hub=hub,
                    scorer=args.scorer, token_budget=args.token_budget)
    streamed = decide_streaming(args.model, args.stream, progress=not args.quiet, needs_out=False)
    if streamed and tasks:
        raise CalibrantError("zero-shot tasks need the model in memory, and this one is evaluated streamed (it does "
                             "not fit, or --stream was given); evaluate perplexity only (--ppl), or pass --no-stream")
    loaded = args.model if streamed else as_loaded(args.model, quiet=args.quiet, chat_template=args.chat_template)
    rows: list[list[Any]] = []
    ppl = {}
    if corpora:
        ppl = evaluate_perplexity(
            loaded, corpora, seq_len=args.seq_len, stride=args.stride,
            max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.quiet, stream=streamed,
            chat_template=args.chat_template if streamed else None,
        )
        rows += [[f"{n} perplexity", f"held-out, seq_len {r.protocol['seq_len']} stride {r.protocol['stride']}",
                  f"{r.tokens} tok", f"{r.ppl:.3f}", "-", f"{r.seconds:.1f}", f"{r.tokens / max(r.seconds, 1e-9):.0f} tok/s"]
                 for n, r in ppl.items()]
    zs = None
    if tasks:
        from calibrant.evaluate.zeroshot import format_table

        zs = evaluate_zeroshot(loaded, tasks, limit=args.limit, num_fewshot=args.fewshot,
                               batch_size=args.batch_size, hub=hub, progress=not args.quiet, scorer=args.scorer,
                               token_budget=args.token_budget)
        rows += [[*r[:-1], f"{r[-1]} items/s"] for r in format_table(zs)]
    print(table(rows, ["evaluation", "data", "n", "perplexity | acc ± stderr", "acc_norm ± stderr", "seconds",
                       "rate"]))
    if zs is not None:
        shots = f"{zs.num_fewshot}-shot" if zs.num_fewshot else "zero-shot"
        print(f"{shots} via lm-eval {zs.lm_eval_version}, data {zs.protocol.get('data')}; "
              f"limit {zs.limit if zs.limit else 'none'} per task; scored by {zs.protocol.get('scorer')}; "
              "average = mean acc over tasks "
              f"(* acc_norm where the task defines it, else acc)")
    if args.json:
        payload: dict[str, Any] = {n: r.to_dict() for n, r in ppl.items()}
        if zs is not None:
            payload["zeroshot"] = zs.to_dict()
        from calibrant.cache import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from calibrant.export.hf import inspect_weights, read_metadata
    from calibrant.models.loader import check_model_dir, resolve_model_dir

    path = resolve_model_dir(args.model, quiet=args.quiet)
    check_model_dir(path)  # a truncated or garbled checkpoint or config: one line naming the file
    meta = read_metadata(path, strict=True) or {}
    w = inspect_weights(path)
    meta_layers = {f"{lay['name']}.weight": lay for lay in meta.get("layers", [])}
    for lay in w["layers"]:  # packed weights: their sparsity is what the compression recorded, if anything
        if lay["sparsity"] is None and "sparsity" in meta_layers.get(lay["name"], {}):
            lay["recorded_sparsity"] = meta_layers[lay["name"]]["sparsity"]
    quant = {name: lay for name, lay in meta_layers.items() if lay.get("scheme")}
    shown = [lay for lay in w["layers"] if args.all or (lay["sparsity"] or 0) > 0 or lay["name"] in quant
             or lay.get("bits") is not None]
    rows = [[lay["name"], "x".join(map(str, lay["shape"] or ["?"])), _sparsity_cell(lay), lay["pattern"] or "-",
             quant.get(lay["name"], {}).get("scheme", lay["dtype"]), _bits_cell(lay, quant)]
            for lay in shown or w["layers"]]
    print(table(rows, ["tensor", "shape", "sparsity", "N:M", "format", "bits/weight"]))
    if any("recorded_sparsity" in lay for lay in shown):
        print("* as recorded at compression: packed weights are not unpacked here")
    packed = w["packed"]
    known = "" if not packed else " (packed weights counted by their shape, as non-zero: their zeros are not read)"
    print(f"\n{path}: {w['parameters']:,} parameters, {w['nonzero_parameters']:,} non-zero{known} "
          f"({1 - w['nonzero_parameters'] / w['parameters']:.2%} zeros overall), {w['bytes_on_disk'] / 1e6:.1f} MB on disk")
    if meta:
        recipe = ", ".join(f"{r['method']}({', '.join(f'{k}={v}' for k, v in r.items() if k != 'method' and v is not None)})"
                           for r in meta.get("recipe", []))
        calib = meta.get("calibration") or {}
        print(f"recipe: {recipe}; calibration: {calib.get('source', 'none')} hash={calib.get('hash', '-')}; "
              f"base: {meta.get('base_model', {}).get('spec')}")
        for method, plan in (meta.get("plans") or {}).items():
            print(_plan_line(method, plan, {lay["name"]: lay for lay in meta.get("layers", [])}))
        if meta.get("effective_bits") and packed:
            export = meta.get("export") or {}
            print(f"quantized layers: {meta['effective_bits']:.3f} effective bits per weight; stored packed "
                  f"({export.get('quantization_format', 'compressed-tensors')}): the bits/weight column is what "
                  "each takes on disk")
        elif meta.get("effective_bits"):
            print(f"quantized layers: {meta['effective_bits']:.3f} effective bits per weight (scales, zero points and "
                  "LoRC factors included); stored here as dequantized floats — use a packed export for the real size")
        outliers = [lay for lay in meta.get("layers", []) if "outlier_fraction" in lay]
        if outliers:
            total = sum(lay["shape"][0] * lay["shape"][1] for lay in outliers)
            kept = sum(lay["outliers"] for lay in outliers)
            print(f"SpQR: {kept:,} outlier weights kept in 16 bit ({kept / total:.3%} of the quantized weights); "
                  f"their positions and values and the quantized statistics are in {meta.get('extras_file', '-')} — "
                  "no runtime reads SpQR's packed format, the weights here are dense")
    # a few zeros from rounding are not sparsity: the notes are for layers pruned on purpose
    sparse = [lay for lay in w["layers"] if (lay["sparsity"] or 0) >= PRUNED]
    if sparse:
        patterns = {lay["pattern"] for lay in sparse}
        if patterns == {None}:
            print("note: unstructured sparsity is stored as dense tensors — this model is no smaller on disk and no "
                  "faster than the dense one. Use an N:M pattern (2:4 runs on sparse tensor cores), structured "
                  "pruning, or packed quantization for real size and speed gains.")
        else:
            print("note: weights are stored dense; the N:M pattern shown can be packed by sparse kernels (e.g. 2:4 "
                  "semi-structured sparsity on NVIDIA Ampere+), which is where its speed-up comes from.")
    return 0


PRUNED = 0.05  # a layer with fewer zeros than this was not pruned (quantization rounds a few weights to 0)


def _sparsity_cell(lay: dict[str, Any]) -> str:
    if lay["sparsity"] is not None:
        return f"{lay['sparsity']:.4f}"
    return f"{lay['recorded_sparsity']:.4f}*" if "recorded_sparsity" in lay else "-"


def _bits_cell(lay: dict[str, Any], quant: dict[str, dict[str, Any]]) -> str:
    if lay.get("bits") is not None:
        return f"{lay['bits']:.3f}"
    if lay["name"] in quant:
        return f"{quant[lay['name']]['effective_bits']:.3f}"
    return {"float32": "32", "float64": "64"}.get(lay["dtype"], "16")


def _plan_line(method: str, plan: dict[str, dict[str, Any]], layers: dict[str, dict[str, Any]]) -> str:
    """One line on a model-level plan recorded in calibrant.json (e.g. OWL's per-block sparsity)."""
    planned = {n: p["sparsity"] for n, p in plan.items() if isinstance(p, dict) and "sparsity" in p}
    if not planned:
        return f"{method} plan: {len(plan)} layers (see calibrant.json)"
    sizes = {n: layers[n]["shape"][0] * layers[n]["shape"][1] if n in layers else 1 for n in planned}
    mean = sum(planned[n] * sizes[n] for n in planned) / sum(sizes.values())
    return (f"{method} plan: sparsity per layer {min(planned.values()):.4f}–{max(planned.values()):.4f}, "
            f"parameter-weighted mean {mean:.4f}, over {len(planned)} layers (per-layer values in calibrant.json)")


def cmd_demo(args: argparse.Namespace) -> int:
    from calibrant.api import compress_model, evaluate_perplexity
    from calibrant.models.loader import load_model

    _heldout_names(args.eval)
    t0 = time.perf_counter()
    loaded = load_model(args.model, quiet=args.quiet)
    dense = evaluate_perplexity(loaded, args.eval, max_tokens=args.max_eval_tokens, progress=not args.quiet)
    result = compress_model(loaded, "wanda", sparsity=0.5, calibration=args.calibration, seed=0, progress=not args.quiet)
    pruned = evaluate_perplexity(loaded, args.eval, max_tokens=args.max_eval_tokens, progress=not args.quiet)
    rows = []
    for name in dense:
        rows.append([f"{name} (held-out, {dense[name].tokens} tok)", "dense", "0.0000", f"{dense[name].ppl:.3f}"])
        rows.append(["", "wanda 50%", f"{result.report.sparsity:.4f}", f"{pruned[name].ppl:.3f}"])
    print(f"\nmodel {args.model} (hash {loaded.model_hash}); calibration {args.calibration} seed 0 "
          f"(hash {result.calibration.hash if result.calibration else '-'})")
    print(table(rows, ["perplexity on", "model", "sparsity", "perplexity"]))
    print(f"compression {result.report.timings['total_s']:.1f}s, whole demo {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_calib_make(args: argparse.Namespace) -> int:
    from calibrant.api import as_loaded
    from calibrant.calibration import make_calibration
    from calibrant.export.hf import check_output_file

    out = Path(args.out)
    if out.exists() and not out.is_dir() and not args.overwrite:
        raise CalibrantError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if out.suffix != ".safetensors" and not out.is_dir():
        raise CalibrantError(f"--out {out} must end in .safetensors (the calibration set is saved as safetensors)")
    check_output_file(out, "--out", "calibration.safetensors")
    loaded = as_loaded(args.model, quiet=args.quiet, chat_template=args.chat_template)
    calib = make_calibration(args.spec, loaded.tokenizer, seed=args.seed, progress=not args.quiet, model=loaded,
                             max_length=loaded.context_length)
    calib.save(out)
    prov = calib.provenance
    timing = prov.get("generation_timing")
    speed = f", generated at {timing['tokens_per_second']:.0f} tok/s" if timing else ""
    print(f"calibration set {calib.hash}: {prov.get('source')} {calib.n}x{calib.seq_len} ({prov.get('sampling')}), "
          f"seed {prov.get('seed')}{speed}")
    print(f"saved: {out}")
    return 0


def cmd_calib_inspect(args: argparse.Namespace) -> int:
    from calibrant.calibration import CalibrationSet, inspect_calibration

    if args.json:
        from calibrant.export.hf import check_output_file

        check_output_file(args.json, "--json", "diagnostics.json")
    calib = CalibrationSet.load(args.file)  # a bad file is refused before any model is loaded
    loaded = None
    if args.model:
        from calibrant.api import as_loaded, check_fits_context

        loaded = as_loaded(args.model, quiet=args.quiet)
        check_fits_context(calib, loaded.context_length)
    diag = inspect_calibration(calib, against=_csv(args.against) or [], model=loaded, batch_size=args.batch_size,
                               progress=not args.quiet)
    print(table(diag.rows(), ["metric", "value"]))
    if args.json:
        from calibrant.cache import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(diag.to_dict(), indent=2, default=str))
    return 0


def _add_stream_options(parser: argparse.ArgumentParser, text: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stream", dest="stream", action="store_const", const=True, default=None, help=text)
    group.add_argument("--no-stream", dest="stream", action="store_const", const=False,
                       help="always load the model in memory")


def build_parser() -> argparse.ArgumentParser:
    from calibrant import __version__
    from calibrant.export.cli import add_export_parser, add_imatrix_parser
    from calibrant.methods import METHODS
    from calibrant.studies.cli import add_study_parser

    p = _Parser(prog="calibrant", description=__doc__)
    p.add_argument("--version", action="version", version=f"calibrant {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model (pruning) with calibration data")
    c.add_argument("--model", default="smollm2-135m", help="alias, HF directory, .gguf file or hub id")
    c.add_argument("--method", required=True,
                   help=f"{' | '.join(METHODS)}, or a chain such as sparsegpt+gptq")
    c.add_argument("--calibration", default="wiki:128x512", help="SOURCE[:options]:NxL or a saved calibration file")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="output directory (Hugging Face format)")
    c.add_argument("--format", dest="export_format", choices=["hf", "compressed-tensors", "gguf"], default="hf",
                   help="--out as dequantized floats (hf, any scheme) or packed integers with scales/zero points "
                        "(compressed-tensors: loads in vLLM and transformers; no LoRC, no dynamic act-order groups, "
                        "group size must divide every input width), or one .gguf file for llama.cpp (gguf: schemes "
                        "gguf-q4_0, gguf-q4_1, gguf-q5_0, gguf-q5_1, gguf-q8_0; llama-architecture models loaded "
                        "from a .gguf)")
    c.add_argument("--gguf-type", default=None, choices=["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "f32"],
                   help="with --format gguf: the file's type; must be the scheme's grid (default: the scheme's; "
                        "f16/f32 for a recipe that quantizes nothing)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier calibrant output (never a directory of other files)")
    c.add_argument("--batch-size", type=positive_int, default=8)
    c.add_argument("--propagate", choices=["compressed", "dense"], default="compressed",
                   help="feed each block the compressed (default) or the dense previous blocks' outputs")
    c.add_argument("--pipeline", choices=["one-pass", "two-pass"], default="one-pass",
                   help="one-pass: each block runs once, each group of linears is compressed when all batches reach "
                        "it (true-sequential, fastest); two-pass: statistics from the dense block, then a second run "
                        "(the reference order; holds one batch's intermediates instead of all batches')")
    c.add_argument("--include", default=None, help="comma-separated name patterns of linears to compress")
    c.add_argument("--exclude", default=None, help="comma-separated name patterns of linears to leave dense")
    c.add_argument("--device", default=None, help="where blocks run (cpu, cuda, cuda:1); default: the model's")
    c.add_argument("--eval", default=None, help="after compressing, perplexity on these corpora (e.g. wiki,news)")
    c.add_argument("--max-eval-tokens", type=positive_int, default=None)
    add_chat_template_option(c)
    c.add_argument("--max-activation-memory", type=byte_size, default=None, metavar="SIZE",
                   help="above this size (e.g. 2G) the calibration activations live in memory-mapped files in the "
                        "cache directory instead of RAM (default: a quarter of the memory available at the start)")
    _add_stream_options(c, "read the model block by block from its safetensors and write each compressed block "
                           "to --out at once (a model larger than memory; the default when the model would not fit "
                           "in memory)")
    c.add_argument("--quiet", action="store_true")
    _add_method_options(c)
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="perplexity on held-out corpora and zero-shot tasks (lm-eval), offline")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--ppl", default=None, help="comma-separated corpora, e.g. wiki,news; CORPUS:chat scores "
                                               "conversations through the chat template (dialogue:chat)")
    e.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks, e.g. arc_easy,piqa (offline: arc_easy, arc_challenge, "
                        "boolq, hellaswag, openbookqa, piqa, rte, winogrande, copa, sciq, lambada, social_iqa, "
                        "commonsense_qa, mmlu); other lm-eval task names run online")
    e.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    e.add_argument("--fewshot", type=int, default=0, help="few-shot examples per prompt (e.g. 5 for MMLU)")
    e.add_argument("--scorer", default="prefix",
                   help="how log-likelihoods are computed: prefix (calibrant's shared-prefix scorer, each distinct "
                        "token once; default) or hf (lm-eval's Hugging Face backend); same answers")
    e.add_argument("--token-budget", type=positive_int, default=None,
                   help="tokens per forward of the prefix scorer (default 4096, or the longest request)")
    e.add_argument("--hub", action="store_true",
                   help="run every task with lm-eval's own definition and Hugging Face data (online)")
    e.add_argument("--seq-len", type=positive_int, default=512)
    e.add_argument("--stride", type=positive_int, default=None,
                   help="window stride (default: seq-len, non-overlapping)")
    e.add_argument("--max-tokens", type=positive_int, default=None, help="evaluate only the first N held-out tokens")
    e.add_argument("--batch-size", type=positive_int, default=8,
                   help="perplexity windows per forward, and the HF scorer's requests per batch")
    e.add_argument("--json", default=None,
                   help="also write the results (with protocol) to this JSON file (zero-shot under 'zeroshot')")
    add_chat_template_option(e)
    _add_stream_options(e, "run a model directory block by block from its safetensors (perplexity only; the "
                           "default when the model would not fit in memory)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="sparsity per layer and size of a model directory")
    i.add_argument("model")
    i.add_argument("--all", action="store_true", help="list dense tensors too")
    i.add_argument("--quiet", action="store_true")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="Wanda 50%% on the default model: dense vs pruned perplexity, offline")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--calibration", default="wiki:32x512")
    d.add_argument("--eval", default="wiki")
    d.add_argument("--max-eval-tokens", type=positive_int, default=16384)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    cal = sub.add_parser("calib", help="make and inspect calibration sets; llama.cpp importance matrices")
    csub = cal.add_subparsers(dest="calib_command", required=True)
    cm = csub.add_parser("make", help="build a calibration set from a spec and save it (.safetensors)")
    cm.add_argument("spec", help="SOURCE[:options][:windows|docs|packed]:NxL, e.g. wiki:128x512, austen:docs:64x512, "
                                 "self:t=1.5..0.8:128x512, file:./my.jsonl:text:64x512")
    cm.add_argument("--model", default="smollm2-135m", help="whose tokenizer (and, for self, generator) to use")
    cm.add_argument("--seed", type=int, default=0)
    cm.add_argument("--out", required=True, help="output file, *.safetensors")
    cm.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_chat_template_option(cm)
    cm.add_argument("--quiet", action="store_true")
    cm.set_defaults(func=cmd_calib_make)
    ci = csub.add_parser("inspect", help="diagnostics of a saved calibration set")
    ci.add_argument("file", help="a calibration set saved by 'calibrant calib make' or CalibrationSet.save")
    ci.add_argument("--against", default=None,
                    help="comma-separated corpora: JS divergence of unigram distributions to their held-out split")
    ci.add_argument("--model", default=None, help="add the dense model's perplexity on the set")
    ci.add_argument("--batch-size", type=positive_int, default=8)
    ci.add_argument("--json", default=None, help="also write the diagnostics to this JSON file")
    ci.add_argument("--quiet", action="store_true")
    ci.set_defaults(func=cmd_calib_inspect)
    add_imatrix_parser(csub)
    add_export_parser(sub)
    add_study_parser(sub)
    __import__("calibrant.search.cli", fromlist=["add_search_parser"]).add_search_parser(sub)
    return p


# API parameter names (written `name` in messages) whose CLI spelling differs from --name
_CLI_NAMES = {"recipe": "--method", "export_format": "--format", "calibration": "--calibration"}


def _cli_names(message: str, parser: argparse.ArgumentParser | None = None) -> str:
    """Messages name API parameters as `name`; on the command line they read as the flag (`damp` → --damp).
    Only names that are options of some command are mapped."""
    flags = dict(_CLI_NAMES)
    for action in _all_actions(parser or build_parser()):
        for option in action.option_strings:
            if option.startswith("--"):
                flags.setdefault(action.dest.removeprefix("method_"), option)
    return re.sub(r"`(\w+)`", lambda m: flags.get(m[1], m[0]), message)


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += _all_actions(sub)
    return actions


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    from calibrant import interrupts
    from calibrant.cache import sweep_stale

    interrupts.install()
    try:
        for line in sweep_stale():  # what killed (SIGKILL) calibrant processes left behind
            print(f"calibrant: {line} (left by a killed calibrant process)", file=sys.stderr)
        return args.func(args)
    except CalibrantError as exc:
        print(f"calibrant: error: {_cli_names(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise
        print(f"calibrant: error: {full}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        what = "SIGTERM" if interrupts.exit_code(exc) == 143 else "interrupted (SIGINT)"
        kept = getattr(args, "on_interrupt", "nothing was written")
        print(f"calibrant: {what}; stopped: {kept}", file=sys.stderr)
        return interrupts.exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
