"""Tiny offline HF pieces for tests: a character-level tokenizer with a chat template and random Llama models."""
from __future__ import annotations

import string

import torch

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB = 128  # >= len(SPECIALS) + len(CHARS) (= 102)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    hf.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = VOCAB, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the default init, so sampling is not uniform noise
        model.lm_head.weight.mul_(20.0) if not tie else None
    return model


def save_tiny_pair(root, student_layers: int = 2, teacher_layers: int = 3):
    """A random `student_layers`-layer student and `teacher_layers`-layer teacher (seeds 0 and 1) with the char
    tokenizer, saved as HF directories root/student and root/teacher; returns root."""
    tok = char_tokenizer()
    for name, layers, seed in (("student", student_layers, 0), ("teacher", teacher_layers, 1)):
        tiny_llama(seed=seed, layers=layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root
