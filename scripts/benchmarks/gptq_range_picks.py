"""GPTQ's coarse-to-fine range search against the full scan, on the default model's real weights.

For every decoder linear of SmolLM2-135M (groups of ``--group-size`` inputs): the share of groups where the
search (:func:`macq.quantizers.gptq._params`, 12 of the 41 shrink factors) keeps the same scale as trying all 41
factors with the same float32 grid arithmetic, and the summed ``|w − q(w)|^2.4`` error of its picks against the
scan's. Data-free: the search runs on the weights as they are, as it does on GPTQ's first block.

    python scripts/bench.py gptq_range_picks --bits 4 3 --json picks.json
"""

from __future__ import annotations

import argparse

import torch


def scan(wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every factor of ``MSE_GRID`` on every group of ``wg [out, k, g]``: the best error and its scale."""
    from macq.quantizers import grid
    from macq.quantizers.gptq import MSE_GRID

    lo, hi = wg.amin(-1), wg.amax(-1)
    best_err, best_s = None, None
    for c in MSE_GRID:
        s, z, _ = grid.params_from_range(lo * c, hi * c, bits, False, "int", torch.float16)
        q = grid.dequantize_codes(grid.quantize_codes(wg, s, z, None, bits), s, z, None, bits)
        e = ((q - wg).abs().double() ** 2.4).sum(-1)
        if best_err is None:
            best_err, best_s = e, s
        else:
            better = e < best_err
            best_err, best_s = torch.where(better, e, best_err), torch.where(better, s, best_s)
    return best_err, best_s


def picks(bits: int, group: int) -> dict[str, float]:
    from safetensors.torch import load_file

    from macq.models import default_model_dir
    from macq.quantizers import grid
    from macq.quantizers.gptq import GPTQConfig, _params

    cfg = GPTQConfig(bits=bits, group_size=group)
    same = total = 0
    err_search = err_scan = 0.0
    for name, w in load_file(str(default_model_dir() / "model.safetensors")).items():
        if w.ndim != 2 or "embed" in name or w.shape[1] % group:
            continue
        wg = w.float().reshape(w.shape[0], -1, group)
        s, z = _params(wg, cfg)
        q = grid.dequantize_codes(grid.quantize_codes(wg, s, z, None, bits), s, z, None, bits)
        e_scan, s_scan = scan(wg, bits)
        err_search += float(((q - wg).abs().double() ** 2.4).sum())
        err_scan += float(e_scan.sum())
        same += int((s == s_scan).sum())
        total += s.numel()
    return {"bits": bits, "group_size": group, "groups": total, "same_pick": same / total,
            "error_vs_scan": err_search / err_scan - 1}


def main(argv: list[str] | None = None) -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json", default=None)
    add_force(ap)
    args = ap.parse_args(argv)
    check_json(args.json, args.force)
    rows = [picks(b, args.group_size) for b in args.bits]
    for r in rows:
        print(f"{r['bits']}-bit g{r['group_size']}: same pick as the 41-factor scan for {r['same_pick']:.2%} of "
              f"{r['groups']} groups; summed error {r['error_vs_scan']:+.3%}")
    if args.json:
        write_json(args.json, "gptq_range_picks", rows)


if __name__ == "__main__":
    main()
