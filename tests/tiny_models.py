"""Tiny models built at test time: a byte-level BPE tokenizer trained on real code,
a Llama-architecture transformers model, and the same kind of model as a GGUF file
for llama.cpp. Random weights, scaled so the next-token distributions are peaked
(clear argmaxes, like a trained model's), a few hundred KB each, built in about a second.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5-Coder's fill-in-the-middle and repository tokens (added only where a test asks: fim=True)
FIM_SPECIALS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_EMBD, N_HEAD, N_KV_HEAD, N_FF, N_LAYER, N_CTX = 64, 4, 2, 128, 2, 1024


def _corpus() -> list[str]:
    return [inspect.getsource(textwrap), inspect.getsource(json.decoder), inspect.getsource(inspect.getsource)]


def build_tokenizer(vocab_size: int = 400, fim: bool = False):
    """A byte-level BPE (GPT-2 style, like Qwen's) trained on stdlib source (``fim``: with the FIM tokens)."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        _corpus(),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS + (FIM_SPECIALS if fim else []),
        show_progress=False,
    )
    return tok


def _vocab_and_merges(tok) -> tuple[list[str], list[str]]:
    model = json.loads(tok._tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _weights(n_vocab: int, seed: int) -> dict[str, np.ndarray]:
    """HF-named weights; scaled so logits are peaked (std of output logits ~ 4)."""
    rng = np.random.default_rng(seed)
    head_dim = N_EMBD // N_HEAD

    def mat(out_dim, in_dim, gain=1.0):
        return (rng.standard_normal((out_dim, in_dim)) * gain / np.sqrt(in_dim)).astype(np.float32)

    w = {
        "model.embed_tokens.weight": rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32),
        "model.norm.weight": np.ones(N_EMBD, np.float32),
        "lm_head.weight": mat(n_vocab, N_EMBD, gain=4.0),
    }
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(N_EMBD, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(N_EMBD, np.float32)
        w[p + "self_attn.q_proj.weight"] = mat(N_HEAD * head_dim, N_EMBD, 2.0)
        w[p + "self_attn.k_proj.weight"] = mat(N_KV_HEAD * head_dim, N_EMBD, 2.0)
        w[p + "self_attn.v_proj.weight"] = mat(N_KV_HEAD * head_dim, N_EMBD)
        w[p + "self_attn.o_proj.weight"] = mat(N_EMBD, N_HEAD * head_dim)
        w[p + "mlp.gate_proj.weight"] = mat(N_FF, N_EMBD)
        w[p + "mlp.up_proj.weight"] = mat(N_FF, N_EMBD)
        w[p + "mlp.down_proj.weight"] = mat(N_EMBD, N_FF)
    return w


def build_hf_model(path: Path, seed: int = 0) -> Path:
    """A tiny LlamaForCausalLM + fast tokenizer (with chat template) saved to ``path``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = build_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    n_vocab = tok.get_vocab_size()
    config = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=N_EMBD,
        intermediate_size=N_FF,
        num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV_HEAD,
        max_position_embeddings=N_CTX,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    state = {k: torch.from_numpy(v) for k, v in _weights(n_vocab, seed).items()}
    model.load_state_dict(state, strict=False)
    model.generation_config = GenerationConfig(eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.bos_token_id)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


def build_gguf_model(
    path: Path, seed: int = 0, vocab_size: int = 400, chat_template: bool = True, fim: bool = False
) -> Path:
    """A tiny llama-architecture GGUF (f32 weights, gpt2-style BPE vocabulary) at ``path`` (with a chat template)."""
    import gguf

    tok = build_tokenizer(vocab_size, fim=fim)
    tokens, merges = _vocab_and_merges(tok)
    n_vocab = len(tokens)
    specials = {t: i for i, t in enumerate(tokens) if t in SPECIALS + FIM_SPECIALS}
    head_dim = N_EMBD // N_HEAD

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV_HEAD)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(specials["<|endoftext|>"])
    writer.add_eos_token_id(specials["<|im_end|>"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)

    w = _weights(n_vocab, seed)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(N_LAYER):
        for hf_name, gg_name in per_layer.items():
            names[f"model.layers.{i}.{hf_name}"] = f"blk.{i}.{gg_name}"
    for hf_name, array in w.items():
        writer.add_tensor(names[hf_name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
