"""A tiny random-weight LLaMA and a tokenizer trained on the test's own corpus.

Saved as an ordinary Hugging Face model directory (``save_pretrained``), so the trainer,
the server and ``make demo`` load it exactly as they would load a real base model, without
downloading anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graft.testing.corpus import chat_records, domain_documents, instruction_records

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def default_training_text(seed: int = 0) -> list[str]:
    """Text covering the synthetic corpus and the prompt templates the trainer renders."""
    docs = domain_documents(200, seed=seed + 1000)
    for rec in instruction_records(100, seed=seed + 1001):
        docs.append(
            f"### User:\n{rec['instruction']}\n\n{rec['input']}\n\n### Assistant:\n{rec['output']}"
        )
    for chat in chat_records(20, seed=seed + 1002):
        docs.append("\n".join(m["content"] for m in chat["messages"]) + "\n### System:\n")
    return docs


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (any text round-trips) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    dest: str | Path,
    *,
    texts: Sequence[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    max_position_embeddings: int = 256,
    initializer_range: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write a random LLaMA (about 150k parameters by default) and its tokenizer to ``dest``.

    ``initializer_range`` is larger than LLaMA's 0.02 on purpose: with the final norm and a
    frozen random ``lm_head`` at 0.02 the logits are nearly uniform whatever the adapters do,
    and LoRA-only training plateaus at the uniform loss.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    tokenizer = train_tokenizer(
        texts if texts is not None else default_training_text(seed), vocab_size
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def build_tiny_adapter(
    base: str | Path,
    dest: str | Path,
    *,
    seed: int = 1,
    r: int = 4,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
) -> Path:
    """A LoRA adapter with random (non-zero) weights for ``base``, saved with peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=list(target_modules),
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        ),
    )
    dest = Path(dest)
    peft_model.save_pretrained(str(dest))
    return dest
