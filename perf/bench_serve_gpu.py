"""``fermi serve`` on a GPU under streaming load (issue 17's serving targets).

Writes a random-weight Qwen3 checkpoint at a real model's shape (bf16 safetensors, a
word-level tokenizer with one word per id so that every sampled id has text, a ChatML
template), starts a real ``fermi serve`` process on it (Granian, the default warm-up), and
streams chat completions at each concurrency: every stream asks for ``--max-tokens``
tokens with ``ignore_eos``. Per level: an untimed pass (the shapes the level meets are
captured on first use), then the timed one: output tokens/s over the wall time, TTFT and
the time per output token (median, p99).

    PYTHONPATH=$PWD python3 perf/bench_serve_gpu.py --shape Qwen3-1.7B --concurrency 1 8 32 128 \
        --out perf/results/h200_serve_qwen3-1.7b.json

``--py-spy S`` samples the server's threads with py-spy (idle samples included, so a
thread blocked on the device shows where it waits) for S seconds of the last level's timed
pass, into ``<out>.pyspy.txt`` (py-spy's raw "collapsed stacks" format).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

TEMPLATE = (
    "{%- for m in messages -%}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> "
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|> assistant {% endif -%}"
)


def write_random_checkpoint(
    folder: Path, shape: str, seed: int = 0, layers: int | None = None
) -> Path:
    """A Qwen3 checkpoint at ``shape``'s sizes with random bf16 weights (norms at 1);
    ``layers`` cuts the depth (a smoke test of this script on a CPU)."""
    import tokenizers
    import torch
    from safetensors.torch import save_file

    from fermi.models.shapes import config

    cfg = dict(config(shape))
    cfg["num_hidden_layers"] = layers or cfg["num_hidden_layers"]
    if cfg["model_type"] != "qwen3":
        raise SystemExit(f"{shape}: only Qwen3 shapes are written here")
    vocab = cfg["vocab_size"]
    words = {f"t{i}": i for i in range(vocab - 2)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    end = tok.token_to_id("<|im_end|>")
    tok_config = {
        "chat_template": TEMPLATE,
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    cfg.update(eos_token_id=end, bos_token_id=None, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end]}))

    hidden, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, q),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, size in shapes.items():
        if len(size) == 1:
            tensors[name] = torch.ones(size, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(size, generator=g) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def body(max_tokens: int, seed: int) -> dict:
    return {
        "messages": [{"role": "user", "content": f"t{seed % 1000} t5 t77 t120 " * 8}],
        "max_tokens": max_tokens,
        "seed": seed,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def level(port: int, concurrency: int, requests: int, max_tokens: int, seed: int) -> dict:
    from bench_serve import Stream, ms, pct, request

    queue = list(range(seed, seed + requests))
    done: list = []

    async def worker() -> None:
        while queue:
            stream = Stream()
            await request(port, "/v1/chat/completions", body(max_tokens, queue.pop()), stream)
            done.append(stream)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(s.completion_tokens for s in done)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_ms": {"median": ms(pct([s.ttft for s in done], 0.5)),
                    "p99": ms(pct([s.ttft for s in done], 0.99))},
        "tpot_ms": {"median": ms(pct([s.tpot for s in done], 0.5)),
                    "p99": ms(pct([s.tpot for s in done], 0.99))},
    }  # fmt: skip


def wait_warm(base: str, began: float, limit_s: float = 600.0) -> float:
    """Seconds from ``began`` until /health lists no replica warming in idle time. The
    levels would otherwise meet the idle warm-up's compiles (a request waits for the unit
    in progress): session 14's first run had a p99 TTFT of 6.6 s at concurrency 8 so."""
    from tests.serving import http

    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        status, _, body = http(base + "/health")
        if status == 200 and not json.loads(body).get("warming"):
            return round(time.perf_counter() - began, 1)
        time.sleep(1.0)
    raise SystemExit(f"the server was still warming up after {limit_s:.0f} s")


def sample_server(port: int, seconds: float, out: Path | None):
    """py-spy on the server listening on ``port`` (Granian's worker is a child process)."""
    import shutil
    import subprocess

    pid = subprocess.check_output(["pgrep", "-f", "--", f"--port {port}"]).split()[0].decode()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    target = f"{out or 'serve'}.pyspy.txt"
    cmd = [spy, "record", "--pid", pid, "--subprocesses", "--threads", "--idle", "-r", "100"]
    cmd += ["-d", str(int(seconds)), "-f", "raw", "-o", target]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="Qwen3-1.7B")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (a smoke test)")
    p.add_argument(
        "--no-wait-warm",
        action="store_true",
        help="measure at once, not after /health says the warm-up is complete",
    )
    p.add_argument("--py-spy", type=float, default=0, metavar="S", help="sample the server")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch

    import tests.serving as serving

    tmp = Path(tempfile.mkdtemp(prefix="fermi-serve-gpu-"))
    started = time.perf_counter()
    model = write_random_checkpoint(tmp / args.shape, args.shape, layers=args.layers)
    written = time.perf_counter() - started
    serve_args = ["--device", args.device, "--max-batch", str(args.max_batch)]
    serve_args += ["--max-seq-len", str(args.max_seq_len)]
    result = {
        "command": " ".join(["perf/bench_serve_gpu.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": args.shape,
        "layers": args.layers,
        "checkpoint_written_s": round(written, 1),
        "levels": [],
    }
    log = tmp / "serve.log"
    began = time.perf_counter()
    try:
        with serving.running_server(model, *serve_args, log=log) as base:
            result["server_healthy_s"] = round(time.perf_counter() - began, 1)
            print(f"server healthy after {result['server_healthy_s']} s", flush=True)
            port = int(base.rsplit(":", 1)[1])
            if not args.no_wait_warm:  # (a run that measures through the idle warm-up)
                result["server_warm_s"] = wait_warm(base, began)
                print(f"idle warm-up complete after {result['server_warm_s']} s", flush=True)
            for i, c in enumerate(args.concurrency):
                n = max(2 * c, 8)
                asyncio.run(level(port, c, c, args.max_tokens, 10_000 * (i + 1)))  # untimed
                last = i == len(args.concurrency) - 1
                spy = sample_server(port, args.py_spy, args.out) if last and args.py_spy else None
                row = asyncio.run(level(port, c, n, args.max_tokens, 1_000 * (i + 1)))
                if spy is not None:
                    row["py_spy_rc"] = spy.wait()
                result["levels"].append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # each level as it ends: a run cut short keeps the ones done
                    args.out.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        result["server_log_tail"] = log.read_text()[-3000:] if log.exists() else ""
        text = json.dumps(result, indent=1)
        if args.out:
            args.out.write_text(text + "\n")
        else:
            print(text)


if __name__ == "__main__":
    main()
