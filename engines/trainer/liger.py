"""liger-kernel (https://github.com/linkedin/Liger-Kernel) in the FSDP2 trainer, opt-in by two keys
under the reference framework's names (configs/schema.py ModelConfig):

- model.use_liger: `apply_kernels` puts liger's Triton RMSNorm, SwiGLU MLP and rotary embedding
  into the HF model instance (liger's `_apply_liger_kernel_to_instance`, the call the reference
  framework makes), with its cross entropy and fused linear cross entropy off: the log-probs are
  ours. liger patches the norms' and MLPs' `forward` on the instance, but the rotary function in
  transformers' modelling module, so every model of that family in the process gets it.
- model.use_fused_kernels: `enable_fused` makes the model's forward, called with
  `token_labels=`, return the per-token log-probs of those labels computed by `token_logprobs`
  from the final hidden states and the output embedding (liger's fused linear cross entropy,
  reduction="none": -log p per token, never the [tokens, vocab] logits whole).

liger-kernel is imported inside the functions only: the CPU install and its tests never need it
(the config refuses either key with trainer.device=cpu, configs/kernels.py).

Gradients through `token_logprobs` (liger-kernel 0.8.5, liger_kernel/ops/fused_linear_cross_entropy.py):
with reduction="none" `LigerFusedLinearCrossEntropyFunction.forward` sets `ctx.defer_grads`,
computes no gradient in forward and saves (input, weight, target); `backward` re-runs
`fused_linear_cross_entropy_forward(..., token_grad_output=grad_output)`, which multiplies each
token's logit gradient by its own upstream gradient before the products summed over tokens into
grad_weight and grad_input. So d(sum_i c_i logp_i) is exact for any per-token c_i (the GRPO loss's
weights), at the price of the chunked logits computed twice (forward and backward). Earlier
releases scaled the already-summed gradients by grad_output, which is wrong for reduction="none".

Temperature: log softmax(h W^T / T) = log softmax((h / T) W^T), so the hidden states are divided
by T (a [tokens, hidden] copy; dividing the weight instead would copy [vocab, hidden]). In bf16 the
two differ from the plain path's bf16 logits / T in fp32 by one bf16 rounding of h / T.
"""

from __future__ import annotations

from typing import Callable

import torch

SUPPORTED = ("qwen2", "llama")
"""HF model types (config.model_type) this build applies liger's kernels to: the Qwen2 presets of
engines/models.py and SmolLM2 (Llama); liger has more, untested here."""


def _hf(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_type(hf_model: torch.nn.Module, key: str) -> None:
    kind = getattr(hf_model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"{key}=true: this build applies liger-kernel to {', '.join(SUPPORTED)} models, not {kind!r}")


def apply_kernels(hf_model: torch.nn.Module) -> None:
    """model.use_liger: liger's RMSNorm, SwiGLU and rotary kernels on `hf_model` (a transformers
    causal LM, before peft and FSDP2; on the meta device too: nothing is allocated), its cross
    entropy and fused linear cross entropy off. Raises ValueError for a model type outside
    SUPPORTED, ImportError without liger-kernel."""
    _check_type(hf_model, "model.use_liger")
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        hf_model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[labels] per token, float32, without the logits.

    hidden: [N, h] final hidden states (after the final norm); weight: [V, h] the output embedding;
    labels: [N] int64 token ids in [0, V). Returns [N] float32 (nats, <= 0), differentiable in
    hidden and weight (module docstring: per-token upstream gradients are honoured). The matmuls
    follow autocast (bf16 on CUDA under the trainer's autocast); the weight gradient accumulates
    in float32 across chunks (accum_dtype). Needs CUDA and liger-kernel (ImportError without)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if labels.numel() == 0:  # liger sizes its chunks by N: no tokens, no call
        return (hidden.sum(-1) * 0).float()
    scaled = hidden / temperature if temperature != 1.0 else hidden
    loss = liger_fused_linear_cross_entropy(
        scaled, weight, labels, reduction="none", accum_dtype=torch.float32
    )  # -log p per token, float32
    return -loss


def enable_fused(hf_model: torch.nn.Module, logprobs: Callable | None = None) -> None:
    """model.use_fused_kernels: `hf_model(..., token_labels=L, temperature=T, logits_to_keep=K)`
    returns [B, K] float32 log-probs of L ([B, K] int64) at the positions K keeps (an int: the
    last K; a [K] int64 tensor: those positions), computed inside the model's own forward, so
    FSDP2 has its root unit (final norm, output embedding) gathered as for the logits. Without
    token_labels the forward is the model's own. `hf_model`: a transformers causal LM with
    `.model` (the decoder stack) and an `nn.Linear` `.lm_head` without bias, patched before peft
    and FSDP2. logprobs: what maps ([N, h], [V, h], [N], T) to [N] (default `token_logprobs`).
    Raises ValueError for another model type or output layer."""
    _check_type(hf_model, "model.use_fused_kernels")
    head = hf_model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError(f"model.use_fused_kernels=true needs a plain Linear output layer, not {type(head).__name__}")
    own, fn = hf_model.forward, logprobs or token_logprobs

    def forward(*args, token_labels=None, temperature: float = 1.0, logits_to_keep=0, **kwargs):
        if token_labels is None:
            return own(*args, logits_to_keep=logits_to_keep, **kwargs)
        for key in ("labels", "return_dict"):  # peft passes these to a causal LM; the decoder takes neither
            if kwargs.pop(key, None) not in (None, True):
                raise ValueError(f"model.use_fused_kernels: the fused forward takes no {key}")
        hidden = hf_model.model(*args, **kwargs).last_hidden_state  # [B, T, h]
        if isinstance(logits_to_keep, int):  # as transformers reads it: the last K positions (0: all)
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden.index_select(1, logits_to_keep)
        if hidden.shape[:2] != token_labels.shape:
            raise ValueError(
                f"token_labels {tuple(token_labels.shape)} do not match the kept positions {hidden.shape[:2]}"
            )
        lp = fn(hidden.reshape(-1, hidden.shape[-1]), hf_model.lm_head.weight, token_labels.reshape(-1), temperature)
        return lp.view(token_labels.shape)

    hf_model.forward = forward


def setup(hf_model: torch.nn.Module, use_liger: bool, use_fused_kernels: bool) -> None:
    """Both keys on one freshly built model (policy or reference), before peft and FSDP2."""
    hf_model = _hf(hf_model)
    if use_liger:
        apply_kernels(hf_model)
    if use_fused_kernels:
        enable_fused(hf_model)
