"""Kernel experiments behind issue #11's choices, interleaved on bare tensors:
``python -m deltatune.bench.kernels`` prints a markdown table (results in docs/PERFORMANCE.md).

- ``stacked``: one product against ``[W; A]`` (then split) against the base product plus a
  separate ``x A^T``, at MiniLM's and SmolLM2's layer shapes;
- ``segments``: a mixed LoRA batch computed with per-row gathered factors (``bmm``, what
  deltatune runs) against one product pair per delta, on rows gathered per delta
  (``index_select`` / ``index_add_``) and on rows already sorted by delta (contiguous slices,
  Punica's SGMV layout).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .interleave import interleaved

R = 8
#: (tokens, in, out): MiniLM at batch 1 x 64 and 32 x 64, SmolLM2 decoding one token
STACKED_SHAPES = [(64, 384, 384), (64, 384, 1536), (64, 1536, 384), (2048, 384, 384), (2048, 384, 1536),
                  (1, 576, 576), (1, 576, 1536)]
#: (rows, tokens per row, deltas, in, out)
SEGMENT_SHAPES = [(32, 64, 4, 384, 384), (32, 64, 16, 384, 384), (32, 64, 4, 1536, 384), (64, 64, 64, 384, 384),
                  (8, 1, 4, 576, 576)]


def stacked(repeats: int = 100) -> list[str]:
    lines = ["| tokens x in -> out | base product ms | + separate x A^T | one product against [W; A] |",
             "|---|---:|---:|---:|"]
    for tokens, d_in, d_out in STACKED_SHAPES:
        x, w, a = torch.randn(tokens, d_in), torch.randn(d_out, d_in), torch.randn(R, d_in)
        b = torch.randn(d_out)
        wa, ba = torch.cat([w, a]), torch.cat([b, torch.zeros(R)])
        with torch.no_grad():
            t = interleaved({"base": lambda: F.linear(x, w, b), "separate": lambda: (F.linear(x, w, b), F.linear(x, a)),
                             "stacked": lambda: F.linear(x, wa, ba)}, repeats, 10)
        sep, st = t.ratio("separate", "base"), t.ratio("stacked", "base")
        lines.append(f"| {tokens} x {d_in} -> {d_out} | {t.ms('base')['median']:.3f} | {sep['median']:.3f}x | "
                     f"{st['median']:.3f}x |")
    return lines


def segments(repeats: int = 30) -> list[str]:
    lines = ["| rows x tokens, deltas, in -> out | gathered (bmm) ms | per delta, gathered rows | "
             "per delta, sorted rows |", "|---|---:|---:|---:|"]
    for rows, tokens, deltas, d_in, d_out in SEGMENT_SHAPES:
        x, out = torch.randn(rows, tokens, d_in), torch.randn(rows, tokens, d_out)
        a, b_t = torch.randn(deltas, R, d_in), torch.randn(deltas, R, d_out)
        a_t = a.transpose(1, 2).contiguous()
        index = torch.arange(rows) % deltas
        members = [(index == p).nonzero().squeeze(1) for p in range(deltas)]
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=deltas).tolist()
        x_sorted, out_sorted = x[order].contiguous(), out[order].contiguous()

        def gathered():
            return out.clone().baddbmm_(torch.bmm(x, a_t[index]), b_t[index])

        def per_delta():
            result = out.clone()
            for p, idx in enumerate(members):
                hidden = F.linear(x.index_select(0, idx).view(-1, d_in), a[p])
                result.index_add_(0, idx, (hidden @ b_t[p]).view(len(idx), tokens, d_out))
            return result

        def sorted_rows():
            result, start = out_sorted.clone(), 0
            for p, count in enumerate(counts):
                hidden = F.linear(x_sorted[start:start + count].view(-1, d_in), a[p])
                result[start:start + count].view(-1, d_out).addmm_(hidden, b_t[p])
                start += count
            return result

        with torch.no_grad():
            torch.testing.assert_close(per_delta(), gathered(), atol=1e-3, rtol=1e-4)
            t = interleaved({"gathered": gathered, "per_delta": per_delta, "sorted": sorted_rows}, repeats, 3)
        lines.append(f"| {rows} x {tokens}, {deltas}, {d_in} -> {d_out} | {t.ms('gathered')['median']:.3f} | "
                     f"{t.ratio('per_delta', 'gathered')['median']:.3f}x | {t.ratio('sorted', 'gathered')['median']:.3f}x |")
    return lines


def main() -> None:
    torch.set_num_threads(2)
    print("\n".join(["### One product against [W; A] (times over the base product alone)", "", *stacked(), "",
                     "### Mixed LoRA batch: per-row gathered factors against one product pair per delta "
                     "(times over gathered)", "", *segments()]))


if __name__ == "__main__":
    sys.exit(main())
