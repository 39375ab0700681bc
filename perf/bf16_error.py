"""bf16 accuracy against an fp32 reference: ours (the CUDA graph runner) and transformers.

Random weights make near-ties, so greedy agreement between two bf16 implementations says
little (0/32 to 14/32 on the H200). This measures instead how far each bf16 path lands
from the float32 logits of the same weights, on the same inputs:

- the weights are transformers' random bf16 initialisation, so the float32 reference (the
  same tensors up-cast, exactly) and both bf16 paths share them bit for bit;
- the token sequence is fixed: a random prompt, then the float32 model's greedy tokens,
  fed to every path (teacher forcing), so each step's inputs are the same everywhere;
- logits are compared at the prompt's last position and after each decode step: max and
  mean |difference|, the difference's RMS over the reference's standard deviation, top-1
  agreement with the reference, and the mean KL(reference || path) of the softmaxes.

Ours runs through ``CudaGraphRunner`` (compiled layers, captured decode graphs, the fused
one-row products and split-KV attention): the path the engine serves. transformers runs
eagerly with its dynamic cache (its static-cache compiled path computes the same products).

    python perf/bf16_error.py --models Qwen3-1.7B Qwen3-8B --out perf/results/h200_bf16_error.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def reference_and_hf(hf, prompt: list[int], steps: int):
    """(tokens fed after the prompt, float32 logits [steps + 1, V], transformers-bf16 logits)."""
    import torch

    def run(model, follow: list[int] | None):
        ids = torch.tensor([prompt], device="cuda")
        out = model(ids, use_cache=True)
        rows, past, fed = [out.logits[0, -1].float()], out.past_key_values, []
        for step in range(steps):
            nxt = int(rows[-1].argmax()) if follow is None else follow[step]
            fed.append(nxt)
            out = model(torch.tensor([[nxt]], device="cuda"), past_key_values=past, use_cache=True)
            rows.append(out.logits[0, -1].float())
            past = out.past_key_values
        return fed, torch.stack(rows)

    with torch.inference_mode():
        hf.float()
        fed, ref = run(hf, None)
        hf.to(torch.bfloat16)
        _, theirs = run(hf, fed)
    return fed, ref, theirs


def ours(cfg: dict, hf, prompt: list[int], fed: list[int], max_seq_len: int):
    import torch
    from bench_decode import our_decoder

    from fermi.runners.torch_cuda import CudaGraphRunner

    model = our_decoder(cfg, hf)  # bf16, transformers' tensors
    runner = CudaGraphRunner(model, 1, max_seq_len, prefill_chunk=2048)
    with torch.inference_mode():
        rows = [runner.prefill(0, prompt, 0).float().clone()]
        for step, token in enumerate(fed):
            rows.append(runner.decode([0], [token], [len(prompt) + step])[0].float().clone())
    return torch.stack(rows)


def errors(ref, got) -> dict:
    import torch

    diff = (got - ref).abs()
    kl = torch.nn.functional.kl_div(
        got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "rms_over_ref_std": (diff.pow(2).mean().sqrt() / ref.std()).item(),
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "mean_kl": kl.mean().item(),
        "positions": ref.shape[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=["Qwen3-1.7B", "Qwen3-8B"])
    p.add_argument("--prompts", type=int, nargs="*", default=[128, 2048])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    from bench_decode import hf_model, prompt_ids

    from fermi.models.shapes import config

    result = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": [],
    }
    for name in args.models:
        cfg = config(name)
        hf = hf_model(cfg)
        for plen in args.prompts:
            prompt = prompt_ids(plen, cfg["vocab_size"], plen)
            fed, ref, theirs = reference_and_hf(hf, prompt, args.steps)
            torch._dynamo.reset()
            mine = ours(cfg, hf, prompt, fed, plen + args.steps + 16)
            row = {
                "model": name,
                "prompt": plen,
                "steps": args.steps,
                "ours_bf16_vs_fp32": errors(ref, mine),
                "transformers_bf16_vs_fp32": errors(ref, theirs),
            }
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        del hf
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
