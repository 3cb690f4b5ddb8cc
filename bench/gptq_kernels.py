"""The kernels behind calibrant's GPTQ, timed one by one, and the float32 factorisation checked on real layers.

    .venv/bin/python bench/gptq_kernels.py      # SmolLM2-135M shapes; about a minute

Part 1 (timings, best of several runs, torch's default threads): the XᵀX accumulation of one 4096-token
batch as one GEMM and as the upper tiles only (``LayerStats``); the damped Cholesky factor ``U`` in
float32 and float64 (``damped_inverse_cholesky``); a finiteness check as ``isfinite(t).all()`` and as
one ``aminmax`` (``all_finite``).

Part 2 (accuracy): Hessians of real layers (wiki 32x512 through SmolLM2-135M, blocks 0, 10, 20, 29),
``U`` factored in float32 and in float64, then GPTQ W4 g64 act-order with each. Prints ‖UᵀU − (H+λI)⁻¹‖
relative to the float64 inverse, and the layer error ‖(W − Ŵ)X‖² / ‖WX‖² with each factor.
"""

from __future__ import annotations

import argparse
import time

import torch


def best_ms(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()

    import calibrant.methods.hessian as hessian
    from calibrant.api import resolve_calibration
    from calibrant.methods.base import LayerStats, all_finite
    from calibrant.methods.gptq import gptq_quantize
    from calibrant.methods.quant import parse_scheme
    from calibrant.models import load_model

    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| kernel | 576 columns (ms) | 1536 columns (ms) |")
    print("|---|---:|---:|")
    rows: dict[str, list[float]] = {}

    def time_kernels(dim: int) -> None:
        x = torch.randn(4096, dim, generator=g)
        full = torch.zeros(dim, dim)
        rows.setdefault("XᵀX, one GEMM", []).append(best_ms(lambda: full.addmm_(x.t(), x)))
        st = LayerStats(dim, "hessian")
        rows.setdefault("XᵀX, upper tiles (LayerStats.add)", []).append(best_ms(lambda: st.add(x)))

        def factor() -> None:
            st.cache.clear()
            hessian.damped_inverse_cholesky(st, 0.01, "bench")

        for dtype in (torch.float32, torch.float64):
            hessian.FLOAT32_FACTOR_DTYPES = (dtype,)
            label = f"U in {str(dtype).removeprefix('torch.')} (damped_inverse_cholesky)"
            rows.setdefault(label, []).append(best_ms(factor))
        H = st.hessian
        rows.setdefault("isfinite(H).all()", []).append(best_ms(lambda: bool(torch.isfinite(H).all())))
        rows.setdefault("all_finite(H)", []).append(best_ms(lambda: all_finite(H)))

    for dim in (576, 1536):
        time_kernels(dim)
    hessian.FLOAT32_FACTOR_DTYPES = (torch.float32, torch.float64)
    for label, (a, b) in rows.items():
        print(f"| {label} | {a:.2f} | {b:.2f} |")

    lm = load_model(args.model, quiet=True)
    ids = resolve_calibration("wiki:32x512", lm.tokenizer, 0, None).input_ids
    layers = lm.model.model.layers
    stats = {}
    for i in (0, 10, 20, 29):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            module = layers[i].get_submodule(name)
            st = stats[(i, name)] = (module, LayerStats(module.in_features, "hessian"))
            module.register_forward_pre_hook(lambda mod, a, st=st[1]: st.add(a[0]))
    with torch.no_grad():
        for b in range(0, ids.shape[0], 8):
            lm.model.model(input_ids=ids[b : b + 8])
    scheme = parse_scheme("w4g64")
    print(f"\n{args.model}, wiki:32x512: float32 against float64 factorisation, GPTQ W4 g64 act-order\n")
    print("| layer | cond(H + λI) | ‖UᵀU − inv‖ / ‖inv‖ f32 | f64 | layer error f32 | f64 |")
    print("|---|---:|---:|---:|---:|---:|")
    for (i, name), (module, st) in stats.items():
        W = module.weight.data.clone()
        H = st.hessian.double() / st.tokens
        perm = torch.argsort(torch.diagonal(st.hessian), descending=True)
        Hp = H[perm][:, perm]
        damped = Hp + 0.01 * Hp.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
        inv = torch.linalg.inv(damped)
        cells = []
        for dtype in (torch.float32, torch.float64):
            hessian.FLOAT32_FACTOR_DTYPES = (dtype,)
            st.cache.clear()
            U, _, _ = hessian.damped_inverse_cholesky(st, 0.01, name, perm)
            Q, *_ = gptq_quantize(W.clone(), U, scheme, perm=perm, static_groups=True)
            d = (W - Q).double()
            err = float(torch.sum((d @ H) * d) / torch.sum((W.double() @ H) * W.double()))
            cells.append((float((U.double().T @ U.double() - inv).norm() / inv.norm()), err))
        hessian.FLOAT32_FACTOR_DTYPES = (torch.float32, torch.float64)
        cond = float(torch.linalg.cond(damped))
        print(f"| {i}.{name} | {cond:.3g} | {cells[0][0]:.1e} | {cells[1][0]:.1e} | {cells[0][1]:.6f} | "
              f"{cells[1][1]:.6f} |")


if __name__ == "__main__":
    main()
