"""Where a decode step's time goes: graph replay (GPU) vs the host loop vs the engine.

Builds one random-weight model, warms the CUDA-graph runner, then for a short and a long
context reports: GPU milliseconds per replay of the batch-1 decode graph (CUDA events), the
runner loop's milliseconds per step (replay + input copy + reading the token back), and the
ten most expensive kernels of one replay (torch.profiler). Writes JSON to --out.

With ``--batch B`` the decode graph profiled is the B-row one, every slot filled to the
context (the loop figure stays batch 1), and ``--prompt-chunk N`` profiles the N-token
prefill graph too: the two graphs a serving step at B streams replays.

    PYTHONPATH=$PWD python3 perf/diag_decode.py --model Qwen3-0.6B --out $OUT/diag.json
    PYTHONPATH=$PWD python3 perf/diag_decode.py --model Qwen3-1.7B --max-batch 128 \
        --batch 128 --contexts 200 --prompt-chunk 128 --no-engine --out $OUT/diag128.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_decode import greedy_loop_seconds, our_decoder, prompt_ids, wordlevel_tokenizer


def replay_ms(graph, n: int = 50) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def loop_ms(runner, context: int, steps: int = 50) -> float:
    return 1e3 * greedy_loop_seconds(runner, context, steps) / steps


def top_kernels(graph, k: int = 12) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        rows.append({"name": e.key[:90], "count": e.count // 3, "us_per_step": total / 3})
    rows.sort(key=lambda r: -r["us_per_step"])
    kernels = sum(r["count"] for r in rows)
    total = sum(r["us_per_step"] for r in rows)
    return [{"kernels_per_step": kernels, "kernel_us_per_step": total}, *rows]


def main() -> None:
    import torch

    from fermi.engine.api import Engine
    from fermi.loading import GenerationDefaults
    from fermi.models.shapes import config
    from fermi.runners.torch_cuda import CudaGraphRunner, pick

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="Qwen3-0.6B")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--decode-attention", default=None, choices=["split", "flex", "math", "sdpa"])
    p.add_argument("--compile-scope", default="layer", choices=["layer", "model"])
    p.add_argument("--batch", type=int, default=1, help="rows of the decode graph profiled")
    p.add_argument("--contexts", default="300,2100", help="comma-separated context lengths")
    p.add_argument("--prompt-chunk", type=int, default=0, help="also profile this prefill")
    p.add_argument("--no-engine", action="store_true", help="skip the engine figure")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not 1 <= args.batch <= args.max_batch:
        p.error("--batch must be within 1..--max-batch")
    cfg = config(args.model)
    model = our_decoder(cfg)
    runner = CudaGraphRunner(
        model,
        args.max_batch,
        args.max_seq_len,
        decode_attention=args.decode_attention,
        compile_scope=args.compile_scope,
    )
    result = {"model": args.model, "startup": dataclasses.asdict(runner.startup)}
    print(result, flush=True)
    runner.sampling.temperature.zero_()
    variant = (False, False, -1)
    for context in (int(c) for c in args.contexts.split(",")):
        ids = prompt_ids(context, cfg["vocab_size"], 1)
        for slot in range(args.batch):
            for start in range(0, context, runner.chunk):
                runner.prefill(slot, ids[start : start + runner.chunk], start)
        loop = [loop_ms(runner, context) for _ in range(3)]
        kv = runner.kv_sizes[[k >= context + 51 for k in runner.kv_sizes].index(True)]
        if args.batch > 1:  # every row one past the context (the graph is keyed by rows)
            slots = list(range(args.batch))
            runner.decode_sample(
                slots,
                [5] * args.batch,
                [context] * args.batch,
                runner.sampling,
                use_filters=False,
                use_penalties=False,
                want_logprobs=-1,
            )
            torch.cuda.synchronize()
        graph = runner._graphs[("decode", args.batch, kv, variant)].graph
        entry = {
            "batch": args.batch,
            "kv_bucket": kv,
            "replay_ms": statistics.median(replay_ms(graph) for _ in range(3)),
            "loop_ms": statistics.median(loop),
            "kernels": top_kernels(graph),
        }
        result[f"context_{context}"] = entry
        brief = {**entry, "kernels": entry["kernels"][:13]}
        print(json.dumps(brief), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    # The longest prefill chunk (and the asked one): milliseconds per replay and its kernels.
    for n in sorted({runner.chunk, args.prompt_chunk} - {0}, reverse=True):
        runner.prefill(0, prompt_ids(n, cfg["vocab_size"], 2), 0)
        key = next(k for k in runner._graphs if k[:2] == ("prefill", pick(n, runner.chunk_sizes)))
        graph = runner._graphs[key].graph
        name = "prefill_chunk" if n == runner.chunk else f"prefill_{n}"
        result[name] = {
            "tokens": n,
            "graph": list(key[:3]),
            "replay_ms": statistics.median(replay_ms(graph, 5) for _ in range(3)),
            "kernels": top_kernels(graph, 20),
        }
        brief = {**result[name], "kernels": result[name]["kernels"][:16]}
        print(json.dumps(brief), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.no_engine:
        return
    # The same runner under the engine (scheduler, overlapped steps, detokenizer).
    engine = Engine(runner, wordlevel_tokenizer(cfg["vocab_size"]), GenerationDefaults(), "diag")
    prompt = prompt_ids(128, cfg["vocab_size"], 128)
    kw = {"prompt_token_ids": prompt, "max_tokens": 256, "ignore_eos": True, "temperature": 0}
    engine.generate(**kw)
    outs = [engine.generate(**kw) for _ in range(3)]
    rates = [(len(o.token_ids) - 1) / o.decode_time for o in outs]
    result["engine_p128"] = {"decode_tok_s": statistics.median(rates), "all": rates}
    print(result["engine_p128"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
