"""Multiply-accumulates of one call of a layer, over every sample in the call.

The counts follow the usual direct computation, the one ``torch.utils.flop_counter`` counts
(flops = 2 x MACs):

* convolution: each output element sums ``in_channels / groups x prod(kernel)`` products;
* transposed convolution: each *input* element is multiplied by
  ``out_channels / groups x prod(kernel)`` weights (products that ``padding`` later crops are
  still computed, so they count);
* linear: each output element sums ``in_features`` products, whatever the leading dimensions;
* multi-head attention: three parts, see :func:`attention_macs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd


def conv_macs(mod: _ConvNd, x: torch.Tensor, y: torch.Tensor) -> int:
    k = prod(mod.kernel_size)
    if mod.transposed:
        return x.numel() * (mod.out_channels // mod.groups) * k
    return y.numel() * (mod.in_channels // mod.groups) * k


def linear_macs(mod: nn.Linear, y: torch.Tensor) -> int:
    return y.numel() * mod.in_features


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: ``seqs`` sequences of ``queries`` queries over ``keys`` keys, each
    query attending to ``attended`` positions (the keys plus the appended columns)."""

    seqs: int
    queries: int
    keys: int
    attended: int


def attention_shape(
    mod: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor
) -> AttentionShape:
    """Read the lengths from ``(L, E)`` (unbatched) or ``(L, N, E)``/``(N, L, E)`` inputs;
    ``add_bias_kv`` and ``add_zero_attn`` each append one column to K and V."""

    def length(t: torch.Tensor) -> int:
        if t.dim() == 2:
            return t.shape[0]
        return t.shape[1] if mod.batch_first else t.shape[0]

    n_q, n_k = length(query), length(key)
    extra = int(mod.bias_k is not None) + int(mod.add_zero_attn)
    return AttentionShape(query.numel() // (n_q * mod.embed_dim), n_q, n_k, n_k + extra)


def attention_macs(mod: nn.MultiheadAttention, s: AttentionShape) -> tuple[int, int, int]:
    """``(in-projection, attention matmuls, out-projection)`` MACs of one call.

    With ``N`` sequences, ``L`` queries, ``S`` keys (``S'`` attended), embedding ``E``: the
    in-projections are ``N (L E E + S kdim E + S vdim E)``; the two attention matmuls
    (``Q K^T`` and ``softmax @ V``, summed over heads) are ``2 N L S' E``; the out-projection
    is ``N L E E``. Softmax, scaling and masks are not MACs.
    """
    e = mod.embed_dim
    proj = s.seqs * e * (s.queries * e + s.keys * (mod.kdim + mod.vdim))
    return proj, s.seqs * 2 * s.queries * s.attended * e, s.seqs * s.queries * e * e
