"""perf/README.md's lead table (issue 17) from the JSON files of one ``lead_table.sh`` round.

Takes any mix of ``bench_decode.py`` results (a model's entry with an error is dropped when
another file has the model), one ``bf16_error.py`` result and one ``start_phases.py``
result, and prints four Markdown tables: batch-1 decode against transformers, batched
aggregate, bf16 error against float32, and a fresh process's start::

    python3 perf/lead_table.py perf/results/h100_lead_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(value, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def decode_tables(benches: list[dict]) -> str:
    models: dict[str, tuple[dict, dict]] = {}
    for res in benches:
        for m in res["models"]:
            if m.get("quantize") or ("error" in m and m["model"] in models):
                continue
            if "error" not in m or m["model"] not in models:
                models[m["model"]] = (m, res)
    one = [
        "| model | ours tok/s | share of roofline (tok/s) | HF eager | HF static + compile "
        "| ours / HF static | ours at prompt 2048 | TTFT 128 / 2048 ms | HF static TTFT 128 "
        "| peak GiB | recompiles | compile + capture |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    many = ["| model | batch 1 | 8 | 32 | 128 |", "|---|---|---|---|---|"]
    for name, (m, res) in models.items():
        if "error" in m:
            one.append(f"| {name} | error: {m['error'][:80]} |")
            continue
        b1, long = m["ours_b1_p128"], m.get("ours_b1_p2048")
        eager, static = m.get("hf_eager_p128"), m.get("hf_static_p128")
        ratio = static and b1["decode_tok_s"] / static["decode_tok_s"]
        start = m["ours_start"]
        one.append(
            f"| {name} | **{b1['decode_tok_s']:.0f}** | {100 * b1['roofline_share']:.0f}% "
            f"({m['roofline_tok_s']:.0f} at {res['read_bandwidth_gb_s']:,.0f} GB/s) | "
            f"{_f(eager and eager['decode_tok_s'])} | {_f(static and static['decode_tok_s'])} | "
            f"{_f(ratio, '.2f')}x | {_f(long and long['decode_tok_s'])} | "
            f"{b1['ttft_ms']:.1f} / {_f(long and long['ttft_ms'], '.1f')} | "
            f"{_f(static and static['ttft_ms'], '.1f')} | {b1['peak_gib']:.1f} | "
            f"{m['recompiles_after_warmup']} | {start['cold_start_s']:.0f} s, "
            f"{start['graphs']} graphs |"
        )
        row = [f"{b1['decode_tok_s']:,.0f}"]
        for b in (8, 32, 128):
            r = m.get(f"ours_b{b}_p128")
            rate = r and r["decode_tok_s"]
            row.append("—" if not rate else f"{rate:,.0f} ({rate / b1['decode_tok_s']:.1f}x)")
        many.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(one) + "\n\n" + "\n".join(many)


def error_table(err: dict) -> str:
    lines = [
        "| model | prompt | RMS error / reference std, ours / transformers | max abs, ours / "
        "transformers | mean KL, ours / transformers | top-1 equal, ours / transformers |",
        "|---|---|---|---|---|---|",
    ]
    for r in err["rows"]:
        a, b = r["ours_bf16_vs_fp32"], r["transformers_bf16_vs_fp32"]
        lines.append(
            f"| {r['model']} | {r['prompt']} | {a['rms_over_ref_std']:.4f} / "
            f"{b['rms_over_ref_std']:.4f} | {a['max_abs']:.3f} / {b['max_abs']:.3f} | "
            f"{a['mean_kl']:.2e} / {b['mean_kl']:.2e} | {100 * a['top1_agreement']:.0f}% / "
            f"{100 * b['top1_agreement']:.0f}% |"
        )
    return "\n".join(lines)


def start_table(start: dict) -> str:
    lines = [
        "| start | import | weights | warm-up to the first request | first token "
        "| to first token | whole warm-up done |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in start["starts"].items():
        lines.append(
            f"| {name.split('_')[-1]} | {s['import_s']:.1f} s | {s['build_weights_s']:.1f} s | "
            f"{s['warmup_s']:.1f} s | {s['first_token_s']:.2f} s | "
            f"**{s['to_first_token_s']:.1f} s** | {s['to_complete_warmup_s']:.1f} s |"
        )
    return "\n".join(lines)


def main(paths: list[str]) -> str:
    results = [json.loads(Path(p).read_text()) for p in paths]
    out = [decode_tables([r for r in results if "models" in r])]
    out += [error_table(r) for r in results if "rows" in r]
    out += [start_table(r) for r in results if "starts" in r]
    return "\n\n".join(out)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
