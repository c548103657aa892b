"""Tiny randomly initialised models and LoRA adapters, built in the tests for speed.

A real byte-level BPE tokenizer is trained on a few sentences, and a 2-layer
llama is saved as an ordinary Hugging Face folder, so every code path (resolve,
load, peft, engine) runs exactly as on a real model.
"""

from __future__ import annotations

from pathlib import Path

TEXT = [
    "The patient was treated with aspirin and recovered within two weeks.",
    "Gene expression of BRCA1 was measured in breast cancer tissue samples.",
    "Question: Is metformin used for type 2 diabetes? Answer: yes.",
    "Revenue rose 12 percent in the third quarter, the company said.",
    "### Instruction:\nAnswer the question.\n\n### Input:\nWhat is DNA?\n\n### Response:\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "1. Instruction: Name the disease.\n1. Input: The child had measles.\n2. Instruction:",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(TEXT * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw._tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model_folder(folder: Path, seed: int = 0, hidden: int = 64, layers: int = 2, architecture: str = "llama") -> Path:
    """Save a tiny random model and its tokenizer as a Hugging Face folder.

    ``architecture`` "gemma3": Gemma 3's layer kinds (sliding-window layers with a
    window of 8 positions, shorter than the test prompts, and a full-attention one).
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    if architecture == "gemma3":
        kinds = ["sliding_attention"] * (layers - 1) + ["full_attention"]
        config = Gemma3TextConfig(**common, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 2, sliding_window=8, layer_types=kinds)
        model = Gemma3ForCausalLM(config)
        with torch.no_grad():  # Gemma's norms multiply by 1 + weight: random weights make them do something
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.3)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are far from ties
        model.lm_head.weight.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_adapter(model_folder: Path, out: Path, seed: int, rank: int = 4, scale: float = 0.3) -> Path:
    """A LoRA adapter on all linear layers with random (non-zero) A and B, saved as a PEFT folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return out
