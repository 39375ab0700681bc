"""The chat templates the small models people run now ship, as test data.

Each ``tests/chat_templates/*.jinja`` file is a model's published chat template, copied
byte for byte from where it was read (Hugging Face itself cannot be reached from here):
``RealTemplate.source`` names the repository, path and commit. A ``RealTemplate`` also
carries the special tokens the template writes, so that a tiny tokenizer holding them
renders and tokenises the template as the model's own would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.tiny import QWEN3_BASE, write_checkpoint_for
from tests.tiny_tokenizer import TINY_VOCAB_SIZE

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
LLAMA_CPP = "ggml-org/llama.cpp (read from its mirror ye-NX/llama.cpp at 1eeb523c)"
HF_JS = "huggingface/huggingface.js at fe42e680"


@dataclass(frozen=True)
class RealTemplate:
    name: str  # the model it comes from
    file: str  # in tests/chat_templates/
    source: str  # repository, path (and commit) it was copied from
    added_tokens: tuple[tuple[str, bool], ...]  # (text, special) beyond the tiny tokenizer's
    bos: str | None
    eos: str
    stop_tokens: tuple[str, ...]  # generation_config's eos tokens
    tools: bool  # the template lists tools passed as `tools=`
    thinking: str  # its convention, in the README's words

    @property
    def text(self) -> str:
        return (TEMPLATES_DIR / self.file).read_text(encoding="utf-8")

    def write(self, folder: Path) -> Path:
        """A tiny random Qwen3 checkpoint whose tokenizer carries this template and its
        special tokens (the architecture does not matter to the template)."""
        extra = len(self.added_tokens)
        return write_checkpoint_for(
            folder,
            {**QWEN3_BASE, "vocab_size": TINY_VOCAB_SIZE + extra, "max_position_embeddings": 2048},
            added_tokens=self.added_tokens,
            tokenizer_config={
                "chat_template": self.text,
                "bos_token": self.bos,
                "eos_token": self.eos,
                "model_max_length": 2048,
            },
            eos_tokens=self.stop_tokens,
        )


_QWEN_TOKENS = (("<tool_response>", False), ("</tool_response>", False))
_DEEPSEEK_TOKENS = (
    ("<｜begin▁of▁sentence｜>", True),
    ("<｜end▁of▁sentence｜>", True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<｜tool▁calls▁begin｜>", False),
    ("<｜tool▁calls▁end｜>", False),
    ("<｜tool▁call▁begin｜>", False),
    ("<｜tool▁call▁end｜>", False),
    ("<｜tool▁outputs▁begin｜>", False),
    ("<｜tool▁outputs▁end｜>", False),
    ("<｜tool▁output▁begin｜>", False),
    ("<｜tool▁output▁end｜>", False),
    ("<｜tool▁sep｜>", False),
)

QWEN3 = RealTemplate(
    name="Qwen3 (0.6B to 32B, hybrid thinking)",
    file="qwen3.jinja",
    source=f"{LLAMA_CPP}: models/templates/Qwen-Qwen3-0.6B.jinja (commit e121edc4); the same "
    f"text is Qwen/Qwen3-0.6B's in {HF_JS}: packages/jinja/test/e2e.test.js",
    added_tokens=_QWEN_TOKENS,
    bos=None,
    eos="<|im_end|>",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    tools=True,
    thinking="enable_thinking switch",
)
QWEN3_2507_INSTRUCT = RealTemplate(
    name="Qwen3-4B-Instruct-2507",
    file="qwen3-2507-instruct.jinja",
    source="nam2350/consultai: models/Qwen3-4B/tokenizer_config.json at 91f6881f (a copy of "
    "Qwen/Qwen3-4B-Instruct-2507, its README beside it), chat_template",
    added_tokens=_QWEN_TOKENS,
    bos=None,
    eos="<|im_end|>",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    tools=True,
    thinking="cannot think",
)
QWEN3_2507_THINKING = RealTemplate(
    name="Qwen3-4B-Thinking-2507",
    file="qwen3-2507-thinking.jinja",
    source="akougkas/warpio-cli: warpio-docs/ai-docs/model_cards/qwen3:4b.md at 8dde6d21 (the "
    "tokenizer_config.json of Ollama's qwen3:4b, Qwen3-4B-Thinking-2507: rope_theta 5e6, "
    "262144 positions), chat_template",
    added_tokens=_QWEN_TOKENS,
    bos=None,
    eos="<|im_end|>",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    tools=True,
    thinking="opens <think> itself",
)
DEEPSEEK_R1_0528_QWEN3 = RealTemplate(
    name="DeepSeek-R1-0528-Qwen3-8B",
    file="deepseek-r1-0528-qwen3.jinja",
    source=f"{HF_JS}: packages/ollama-utils/src/chat-template-automap.ts, entry "
    "library/deepseek-r1:latest (Ollama's DeepSeek-R1-0528-Qwen3-8B GGUF), field gguf; its "
    "'\\n' escapes are newlines there, which renders the same",
    added_tokens=_DEEPSEEK_TOKENS,
    bos="<｜begin▁of▁sentence｜>",
    eos="<｜end▁of▁sentence｜>",
    stop_tokens=("<｜end▁of▁sentence｜>",),
    tools=False,
    thinking="model opens <think> itself",
)
SMOLLM3 = RealTemplate(
    name="SmolLM3-3B",
    file="smollm3.jinja",
    source=f"{HF_JS}: packages/jinja/test/e2e.test.js, entry HuggingFaceTB/SmolLM3-3B",
    added_tokens=(),
    bos=None,
    eos="<|im_end|>",
    stop_tokens=("<|im_end|>",),
    tools=True,
    thinking="enable_thinking switch, /think and /no_think in the system message",
)
GEMMA3 = RealTemplate(
    name="Gemma 3 (270M to 27B, -it)",
    file="gemma3-it.jinja",
    source="huggingface/transformers: src/transformers/models/gemma3/convert_gemma3_weights.py "
    f"at 0d7e95d9, _CHAT_TEMPLATE; byte-identical to {HF_JS}: "
    "packages/ollama-utils/src/chat-template-automap.ts, entry library/gemma3:270m",
    added_tokens=(
        ("<bos>", True),
        ("<eos>", True),
        ("<start_of_turn>", True),
        ("<end_of_turn>", True),
        ("<start_of_image>", True),
    ),
    bos="<bos>",
    eos="<eos>",
    stop_tokens=("<eos>", "<end_of_turn>"),
    tools=False,
    thinking="cannot think",
)
PHI4_MINI = RealTemplate(
    name="Phi-4-mini-instruct",
    file="phi-4-mini-instruct.jinja",
    source=f"{HF_JS}: packages/ollama-utils/src/chat-template-automap.ts, entry "
    "library/phi4-mini:3.8b, field gguf",
    added_tokens=(
        ("<|system|>", True),
        ("<|user|>", True),
        ("<|assistant|>", True),
        ("<|end|>", True),
        ("<|tool|>", True),
        ("<|/tool|>", True),
    ),
    bos="<|endoftext|>",
    eos="<|endoftext|>",
    stop_tokens=("<|end|>", "<|endoftext|>"),
    tools=False,  # its tools ride in the system message's own `tools` field
    thinking="cannot think",
)
GRANITE33 = RealTemplate(
    name="Granite 3.3 instruct (2B, 8B)",
    file="granite-3.3-instruct.jinja",
    source=f"{LLAMA_CPP}: models/templates/ibm-granite-granite-3.3-2B-Instruct.jinja "
    "(commit 3db4da56)",
    added_tokens=(
        ("<|end_of_text|>", True),
        ("<|start_of_role|>", True),
        ("<|end_of_role|>", True),
        ("<|tool_call|>", True),
    ),
    bos="<|end_of_text|>",
    eos="<|end_of_text|>",
    stop_tokens=("<|end_of_text|>",),
    tools=True,
    thinking="thinking switch, without a system message only",
)
LLAMA32 = RealTemplate(
    name="Llama 3.2 instruct (1B, 3B)",
    file="llama-3.2-instruct.jinja",
    source=f"{LLAMA_CPP}: models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja "
    "(commit 8b576b6c)",
    added_tokens=(
        ("<|begin_of_text|>", True),
        ("<|end_of_text|>", True),
        ("<|start_header_id|>", True),
        ("<|end_header_id|>", True),
        ("<|eom_id|>", True),
        ("<|eot_id|>", True),
        ("<|python_tag|>", True),
    ),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    stop_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    tools=True,
    thinking="cannot think",
)

ALL = {
    "qwen3": QWEN3,
    "qwen3-2507-instruct": QWEN3_2507_INSTRUCT,
    "qwen3-2507-thinking": QWEN3_2507_THINKING,
    "deepseek-r1-0528-qwen3": DEEPSEEK_R1_0528_QWEN3,
    "smollm3": SMOLLM3,
    "gemma3": GEMMA3,
    "phi-4-mini": PHI4_MINI,
    "granite-3.3": GRANITE33,
    "llama-3.2": LLAMA32,
}
