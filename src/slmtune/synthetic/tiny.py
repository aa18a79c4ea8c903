"""A tiny Llama-architecture model and tokenizer, built fully offline, for tests, CI and quick tries.

`build_tiny_model(out_dir)` writes a normal Hugging Face checkpoint folder (config, safetensors, tokenizer with
a ChatML chat template) that every stage loads like any real model. It is random-initialised, so what it
generates is noise until trained — which is exactly what the tests need: a small loss that can fall.

Sizes: hidden 64, 2 layers, 4 heads (2 KV heads), vocab ~600 → ~110k parameters; a training step takes
milliseconds. Every linear layer's widths are multiples of 64 on purpose: bitsandbytes quantizes in blocks of 64
input features and, on CPUs with AVX512-BF16, repacks 4-bit weights for its inference kernel in blocks of 32
output features (`_convert_weight_packed_for_cpu`: in_features // 64 blocks per row) — a 32-wide layer gives 0
blocks there and crashes. So q/o are 64×64, k/v 32×64 (2 KV heads × head_dim 16), gate/up 128×64, down 64×128.
"""

from __future__ import annotations

from pathlib import Path

# ChatML like SmolLM2's: it ignores `tools`, so the tools-in-system-turn fallback of `slmtune.render` is what
# the tests exercise, as it is for the default SLM. `{% generation %}` marks the assistant tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_CORPUS = [
    "You are a helpful assistant. Call the tool get_weather with the city and unit.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "<tool_call> </tool_call> <tools> </tools> <tool_response> </tool_response>",
    "What is the weather in Berlin, London, Tokyo, Madrid, Rome, Oslo, Lima, Cairo?",
    "Classify the sentiment: positive negative neutral. Extract category urgency product.",
    "The quick brown fox jumps over the lazy dog 0123456789 {}[]:,\"' .!?-_/\\",
    "system user assistant tool function arguments parameters type object string integer",
]


def build_tokenizer():
    """A byte-level BPE tokenizer trained on a few lines of agent-like text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden: int = 64, intermediate: int = 128,
                     layers: int = 2, init_std: float = 0.1) -> Path:
    """Write a tiny random Llama + tokenizer checkpoint to `out_dir`; returns the folder.

    `init_std` 0.1, not Llama's 0.02: with 0.02 a 64-wide model's logits start near-uniform and the gradient
    reaching LoRA through the tied embedding is ~5× smaller — 12 steps then moved the loss 0.2 (noise), with
    0.1 they move it 3.5 (6.6 → 2.7), on LoRA and QLoRA, fp32 and bf16 alike, so the tests can tell learning."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
_CITIES = ["Paris", "Berlin", "London", "Tokyo", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Lisbon", "Vienna",
           "Prague", "Dublin", "Athens", "Seoul", "Delhi"]
_ASKS = ["What is the weather in {c}?", "How warm is it in {c} right now?", "Weather for {c} please",
         "Is it raining in {c}?", "Tell me the temperature in {c}, in {u}."]


def weather_records(n: int, seed: int = 0) -> list[dict]:
    """`n` canonical tool-calling records (a learnable errand: the city in the question is the argument)."""
    import json
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        city, unit = rng.choice(_CITIES), rng.choice(["celsius", "fahrenheit"])
        ask = rng.choice(_ASKS)
        args = {"city": city, "unit": unit} if "{u}" in ask else {"city": city}
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(args)}}
        out.append({
            "id": f"weather-{seed}-{i}",
            "messages": [
                {"role": "system", "content": "You are a weather assistant. Use the tools."},
                {"role": "user", "content": ask.format(c=city, u=unit)},
                {"role": "assistant", "content": None, "tool_calls": [call]},
            ],
            "tools": [WEATHER_TOOL],
            "meta": {"source": "slmtune.synthetic.tiny"},
        })
    return out
