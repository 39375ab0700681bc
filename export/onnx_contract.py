"""The files that tell other runtimes how to run an ONNX artefact: ``genai_config.json``
(onnxruntime-genai's model description) and ``README.md`` (the graph's contract, with an
example for plain onnxruntime that tests/test_export_onnx.py runs as written)."""

from __future__ import annotations

import json
from pathlib import Path

from fermi.loading import GenerationDefaults
from fermi.models.decoder import ModelConfig

GENAI_CONFIG = "genai_config.json"
README = "README.md"
# onnxruntime-genai's model types for our architectures (its decoder-only LLM types);
# "decoder" is its generic one.
GENAI_TYPES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
}


def genai_config(
    cfg: ModelConfig,
    generation: GenerationDefaults,
    bos_token_id: int | None,
    max_seq_len: int,
    model_file: str,
) -> dict:
    """onnxruntime-genai's description of the graph: names, cache shapes, and search
    defaults with ``past_present_share_buffer`` on (the graph's attention writes the
    present cache in place when past and present are one buffer)."""
    eos = list(generation.eos_token_ids)
    search = {
        "max_length": max_seq_len,
        "past_present_share_buffer": True,
        "do_sample": bool(generation.do_sample),
        "num_beams": 1,
        "num_return_sequences": 1,
        "min_length": 0,
        "repetition_penalty": generation.repetition_penalty or 1.0,
        "temperature": generation.temperature or 1.0,
        "top_k": generation.top_k or 50,
        "top_p": generation.top_p or 1.0,
    }
    return {
        "model": {
            "type": GENAI_TYPES.get(cfg.architecture, "decoder"),
            "context_length": max_seq_len,
            "vocab_size": cfg.vocab_size,
            "bos_token_id": bos_token_id if bos_token_id is not None else (eos[0] if eos else 0),
            "eos_token_id": eos,
            "pad_token_id": eos[0] if eos else 0,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "head_size": cfg.head_dim,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": search,
    }


def readme(cfg: ModelConfig, source: str, cache_dtype: str, max_seq_len: int, quantize: str) -> str:
    """The artefact's README: what the graph takes and returns, both ways to hold the
    cache, and a complete greedy loop for plain onnxruntime."""
    layers, kv, dim, vocab = (
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    numpy_dtype = dtype = "float16" if cache_dtype == "float16" else "float32"
    weights = (
        f"{quantize} linear weights (onnxruntime's MatMulNBits, blocks of 32)"
        if quantize != "none"
        else f"{numpy_dtype} weights"
    )
    return f"""# {cfg.architecture} (ONNX, exported by Fermi Infer from `{source}`)

`model.onnx`: one graph for prompt and generation steps, {weights}, contexts up to
{max_seq_len} tokens. It runs on onnxruntime (CPU; CUDA in fp16): each layer's attention
is onnxruntime's `com.microsoft.GroupQueryAttention`, the layout onnxruntime-genai's own
model builder writes. `genai_config.json` lets onnxruntime-genai run the folder as it is.

## Inputs

| name | shape | type |
|---|---|---|
| `input_ids` | [batch_size, sequence_length] | int64 |
| `attention_mask` | [batch_size, total_sequence_length] | int64 |
| `position_ids` | [batch_size, sequence_length] | int64 |
| `past_key_values.N.key` / `.value` | [batch_size, {kv}, past_sequence_length, {dim}] | {dtype} |

N is the layer, 0 to {layers - 1}.

## Outputs

| name | shape | type |
|---|---|---|
| `logits` | [batch_size, 1, {vocab}] (each row's last token) | float32 |
| `present.N.key` / `.value` | [batch_size, {kv}, present_sequence_length, {dim}] | {dtype} |

Row b's `attention_mask` holds one 1 per token of its sequence so far, this step's
included (L_b ones, then zeros when rows differ in length); this step's tokens sit at
positions L_b - sequence_length .. L_b - 1, which `position_ids` repeats.
`total_sequence_length` is the longest L_b. A step with several tokens (a prompt, or a
chunk of one) takes one row.

The cache can be held two ways:

- **Growing**: pass the previous step's `present.N.*` as `past_key_values.N.*` (empty,
  with past_sequence_length 0, at the first step); present_sequence_length is then
  past_sequence_length + sequence_length.
- **In place**: allocate one buffer per input of max length ({max_seq_len}) and bind it
  as both `past_key_values.N.*` and `present.N.*` with onnxruntime's IO binding; the step
  writes its entries into it and attends only over each row's first L_b positions
  (onnxruntime-genai's `past_present_share_buffer`, set in `genai_config.json`).

## Greedy generation with plain onnxruntime

```python
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
tokenizer = Tokenizer.from_file("tokenizer.json")
prompt = tokenizer.encode("The capital of France is").ids
empty = np.zeros((1, {kv}, 0, {dim}), np.{numpy_dtype})
names = [f"past_key_values.{{i}}.{{kind}}" for i in range({layers}) for kind in ("key", "value")]
cache = dict.fromkeys(names, empty)
tokens, new = list(prompt), list(prompt)
for _ in range(16):
    start = len(tokens) - len(new)
    logits, *present = session.run(None, {{
        "input_ids": np.array([new], np.int64),
        "attention_mask": np.ones((1, len(tokens)), np.int64),
        "position_ids": np.arange(start, len(tokens), dtype=np.int64)[None],
        **cache,
    }})
    cache = dict(zip(cache, present))  # present.N.key/value, in the inputs' order
    new = [int(logits[0, -1].argmax())]
    tokens += new
print(tokens[len(prompt):])
print(tokenizer.decode(tokens[len(prompt):]))
```

## With onnxruntime-genai

```python
import onnxruntime_genai as og

model = og.Model(".")  # this folder
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=64)
generator = og.Generator(model, params)
generator.append_tokens([prompt ids])
while not generator.is_done():
    generator.generate_next_token()
print(generator.get_sequence(0))
```
"""


def write(folder: Path, config: dict, text: str) -> None:
    (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / README).write_text(text, encoding="utf-8")


def readme_example(text: str) -> str:
    """The plain-onnxruntime example of a README (its first python block)."""
    start = text.index("```python\n") + len("```python\n")
    return text[start : text.index("```", start)]
