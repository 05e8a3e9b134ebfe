"""Build megatron-core GPTModels (student and teacher) from a small architecture description.

`ModelArch` is the architecture in Hugging Face terms (what a Llama / Qwen2 / Qwen3 config.json holds);
`build_gpt_model` turns it into a TP/PP-sharded `GPTModel` for this rank's pipeline stage, with the
Transformer Engine layer spec when TE is importable and megatron-core's local (pure torch) spec otherwise.
`megatron_tropd.hf` maps HF config.json files to `ModelArch` and converts weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_tropd.distributed import cpu_compat
from megatron_tropd.distributed.parallel import ParallelGroups
from megatron_tropd.models.arch import ModelArch, check_layout


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return torch.cuda.is_available()


@dataclass
class BuildOptions:
    """Numerics and memory options that are not part of the architecture."""

    params_dtype: torch.dtype = torch.float32
    use_te: bool | None = None  # None = auto (TE when importable and CUDA present)
    recompute_activations: bool = False
    sequence_parallel: bool = False
    extra_config: dict = field(default_factory=dict)


def transformer_config(arch: ModelArch, groups: ParallelGroups, opts: BuildOptions):
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_layout(arch, groups.tp_size, groups.pp_size)
    bf16 = opts.params_dtype == torch.bfloat16
    fp16 = opts.params_dtype == torch.float16
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        sequence_parallel=opts.sequence_parallel and groups.tp_size > 1,
        params_dtype=opts.params_dtype,
        bf16=bf16,
        fp16=fp16,
        pipeline_dtype=opts.params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        init_method_std=0.02,
        recompute_granularity="full" if opts.recompute_activations else None,
        recompute_method="uniform" if opts.recompute_activations else None,
        recompute_num_layers=1 if opts.recompute_activations else None,
    )
    kwargs.update(opts.extra_config)
    return TransformerConfig(**kwargs)


class LocalNorm:
    """The local spec's RMSNorm / LayerNorm (torch) that also runs under sequence parallelism: megatron-core's
    `WrappedTorchNorm` refuses `sequence_parallel`, although only one thing is missing -- the norm weights must be
    marked `sequence_parallel` so that `finalize_model_grads` sums their gradients over TP (each TP rank sees a
    slice of the sequence), which is what Transformer Engine's norms do. Used on CPU and on GPUs without TE."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = cls.marks_sequence_parallel and config.sequence_parallel
        return norm

    marks_sequence_parallel = True


class LocalQKNorm(LocalNorm):
    """Query/key norms act per head on the gathered sequence: megatron sums their gradients over TP by name."""

    marks_sequence_parallel = False


def layer_spec(arch: ModelArch, use_te: bool, config=None, pp_rank: int | None = None):
    """The layer spec (TE) or, for the local spec, the block's submodules with `LocalNorm` everywhere."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = LocalNorm
    attention = layer.self_attention.submodules
    if attention.q_layernorm is not IdentityOp:
        attention.q_layernorm = attention.k_layernorm = LocalQKNorm
    if config is None:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, pp_rank=pp_rank),
                                      layer_norm=LocalNorm)


def build_gpt_model(arch: ModelArch, groups: ParallelGroups, opts: BuildOptions | None = None):
    """This rank's stage of a GPTModel; logits stay vocabulary-sharded ([s, b, V_padded/tp])."""
    from megatron.core.models.gpt import GPTModel

    opts = opts or BuildOptions()
    use_te = transformer_engine_available() if opts.use_te is None else opts.use_te
    config = transformer_config(arch, groups, opts)
    rope_scaling = arch.rope_scaling or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type not in (None, "default", "llama3"):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, llama3)")
    with cpu_compat.tensor_cuda_is_noop():
        model = _gpt_model(GPTModel, arch, groups, config, use_te, rope_type, rope_scaling)
    # megatron's llama3 scaling hard-codes low/high_freq_factor=1/4 and original_max_position_embeddings=8192 and
    # truncates a float theta to int: set inv_freq exactly as HF computes it (before any forward fills its cache).
    if getattr(model, "rotary_pos_emb", None) is not None:
        model.rotary_pos_emb.inv_freq = rope_inv_freq(arch, model.rotary_pos_emb.inv_freq.device)
    if groups.device.type == "cuda":
        model = model.cuda()
    return model


def _gpt_model(GPTModel, arch, groups, config, use_te, rope_type, rope_scaling):
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te, config, groups.pp_rank),
        vocab_size=arch.padded_vocab_size(groups.tp_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
        rope_scaling=rope_type == "llama3",
        rope_scaling_factor=float(rope_scaling.get("factor", 8.0)),
        pg_collection=groups.pg_collection(),
    )


def rope_inv_freq(arch: ModelArch, device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2], as HF transformers computes them.

    default: inv_freq_i = 1 / theta^(2i/d).  llama3: with wavelen = 2*pi/inv_freq, L = original_max_position_embeddings,
    wavelen > L/low_freq_factor -> inv_freq/factor; wavelen < L/high_freq_factor -> unchanged; in between
    (1 - s) * inv_freq/factor + s * inv_freq with s = (L/wavelen - low) / (high - low).
    """
    import math

    dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
    inv_freq = 1.0 / (arch.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    scaling = arch.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(device)
