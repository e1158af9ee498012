"""The GPT: a Llama/Qwen3-compatible decoder-only Transformer in one readable file.

token embedding -> n_layer x [RMSNorm -> attention (RoPE, grouped-query heads, optional per-head QK RMSNorm)
-> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head (tied or untied). No biases.

The layer names and math match Hugging Face's `LlamaForCausalLM` / `Qwen3ForCausalLM` so that an export is exact:
`q_proj k_proj v_proj o_proj`, `gate_proj up_proj down_proj`, `input_layernorm post_attention_layernorm`, and
RoPE in the "rotate half" layout. `forward` always returns logits; losses live with the training loops.
There is no distributed code here: parallelism is applied from outside (llmlab.dist).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import LLMLabError


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 2048
    """tokens in the vocabulary (special tokens included)"""
    n_layer: int = 4
    """Transformer blocks"""
    d_model: int = 128
    """width of the residual stream"""
    n_head: int = 4
    """query heads"""
    n_kv_head: int = 4
    """key/value heads (grouped-query attention when fewer than n_head; must divide n_head)"""
    head_dim: int = 0
    """width of one head; 0 means d_model // n_head"""
    ffn_hidden: int = 0
    """hidden width of the SwiGLU MLP; 0 means about 8/3 * d_model rounded up to a multiple of 64"""
    context_len: int = 256
    """longest sequence the model (and its RoPE tables) supports"""
    rope_theta: float = 10000.0
    """RoPE base frequency"""
    norm_eps: float = 1e-6
    """epsilon of every RMSNorm"""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3); False gives the Llama layout"""
    tie_embeddings: bool = False
    """share the token embedding and the LM head"""
    num_labels: int = 0
    """0: a language model (an LM head over the vocabulary). N > 0: a scorer (a reward model): a linear `score`
    head of N outputs per position replaces the LM head, as in Hugging Face's LlamaForSequenceClassification"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "context_len"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"model: {name} must be positive (got {getattr(self, name)})")
        if self.n_head % self.n_kv_head:
            raise LLMLabError(f"model: n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim == 0 and self.d_model % self.n_head:
            raise LLMLabError(f"model: d_model ({self.d_model}) must be divisible by n_head ({self.n_head}), or set head_dim")
        if self.hdim % 2:
            raise LLMLabError(f"model: head_dim must be even for RoPE (got {self.hdim})")
        if self.num_labels < 0 or (self.num_labels and self.tie_embeddings):
            raise LLMLabError(f"model: num_labels must be >= 0, and a scorer (num_labels > 0) has no LM head to tie "
                              f"(got num_labels={self.num_labels}, tie_embeddings={self.tie_embeddings})")

    @property
    def hdim(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


class Rotary(nn.Module):
    """RoPE tables (cos, sin) for positions 0..context_len-1, "rotate half" layout (first half pairs with second)."""

    def __init__(self, head_dim: int, context_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        freqs = torch.outer(torch.arange(context_len, dtype=torch.float32), inv_freq)  # (L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, D)
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin broadcastable to (B, H, T, D)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:  # per-row positions: (B, 1, T, D)
            return cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin  # (T, D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to a fixed length.

    Rows may start with left padding (`pad_lens`): padded keys are masked out and each row's positions count
    from its first real token, so a padded row computes exactly what it would alone. `length` is the number of
    filled positions (the same for all rows); the model writes at `length` and the caller calls `advance(T)`.
    The engine's compiled decode step (llmlab.engine) writes with `write_at` instead, which takes the position
    as a tensor.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, pad_lens: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        # each row's positions count from its first real token: the cache may be longer than the context by the
        # most padding, so that a short prompt beside a long one still has the context's room (the rows that
        # reach the end of the context must then leave the batch: `GPT.forward` checks the least padded row)
        self.pads = [0] * batch_size if pad_lens is None else pad_lens.tolist()
        if max_len - max(self.pads) > cfg.context_len:
            raise LLMLabError(f"KV cache of {max_len} positions exceeds the model's context of {cfg.context_len}")
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.hdim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.pad_lens = pad_lens if any(self.pads) else None

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def positions(self, T: int) -> torch.Tensor:
        """RoPE positions of the next T tokens: (T,) or (B, T) when rows are padded."""
        return self.row_positions(torch.arange(self.length, self.length + T, device=self.k.device))

    def row_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Cache indices (T,) -> RoPE positions: (T,), or (B, T) counted from each row's first real token."""
        if self.pad_lens is None:
            return pos
        return (pos[None, :] - self.pad_lens[:, None]).clamp(min=0)

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Boolean (B, 1, T, length+T) mask (True = attend), or None when plain causal attention is exact."""
        if self.pad_lens is None and (T == 1 or self.length == 0):
            return None
        L = self.length + T
        q_pos = torch.arange(self.length, L, device=self.k.device)
        k_pos = torch.arange(L, device=self.k.device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, L)
        if self.pad_lens is not None:
            mask = mask & (k_pos[None, None, None, :] >= self.pad_lens[:, None, None, None])
        return mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at the current length; return all keys/values so far (B, Hkv, length+T, D)."""
        T = k.size(2)
        end = self.length + T
        if end > self.max_len:
            raise LLMLabError(f"sequence of {end} tokens exceeds the KV cache of {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write_at(self, layer: int, key_pos: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position k, v (B, Hkv, D) at index key_pos[-1]; return the keys and values up to it,
        (B, Hkv, len(key_pos), D). For a compiled step: key_pos = arange(length + 1) carries the step number
        as a tensor (its length a dynamic dimension) rather than an int the step would be specialised on, and
        the write indexes the whole tensor (a write into a view of a graph input is compiled as a copy of the
        whole cache). The caller calls `advance(1)`."""
        index = [key_pos.new_full((1,), layer), None, None, key_pos[-1:]]
        torch.ops.aten.index_put_(self.k, index, k[None])  # the Python method takes no None (= whole dim)
        torch.ops.aten.index_put_(self.v, index, v[None])
        n = key_pos.size(0)
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    @property
    def reach(self) -> int:
        """Tokens in the longest row, padding not counted (what `GPT.forward` checks against the context)."""
        return self.length - min(self.pads)

    def advance(self, T: int) -> None:
        self.length += T

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the batch, in that order): the keys and values of the others are dropped."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        self.pads = [self.pads[i] for i in rows.tolist()]
        if self.pad_lens is not None:
            self.pad_lens = self.pad_lens.index_select(0, rows)

    def expand(self, batch_size: int) -> KVCache:
        """A cache for batch_size rows that all continue this single-row cache (prefill once, sample many)."""
        assert self.batch_size == 1 and self.pad_lens is None
        new = object.__new__(KVCache)
        new.k = self.k.expand(-1, batch_size, -1, -1, -1).contiguous()
        new.v = self.v.expand(-1, batch_size, -1, -1, -1).contiguous()
        new.max_len, new.length, new.pad_lens, new.pads = self.max_len, self.length, None, [0] * batch_size
        return new


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.hdim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.hdim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.hdim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.hdim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.hdim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.hdim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.hdim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        causal = True
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, Hkv, L, D)
            causal = mask is None and T > 1  # decode (T == 1) attends to every cached key
        gqa = self.n_kv_head != self.n_head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           enable_gqa=gqa)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.num_labels:
            self.score = nn.Linear(cfg.d_model, cfg.num_labels, bias=False)
        else:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.hdim, cfg.context_len, cfg.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every tensor (deterministically when `seed` is given).

        - embed_tokens: N(0, 1) when untied: its output goes straight into RMSNorm, so the scale is free;
          N(0, 1/sqrt(d_model)) when tied, so that the logits of the shared head start near unit scale.
        - lm_head (untied): N(0, 0.001): logits start near zero, so the first loss is about ln(vocab_size).
        - score (a scorer's head): zeros, so every sequence starts with the same score.
        - q_proj, k_proj, v_proj, gate_proj, up_proj: U(-a, a) with a = sqrt(3 / fan_in), i.e. unit-variance
          outputs for unit-variance inputs.
        - o_proj, down_proj: zeros, so every block starts as the identity and the residual stream as the
          embedding (as in nanochat/modded-nanogpt); gradients still flow because their inputs are non-zero.
        - RMSNorm weights: ones.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        d = self.config.d_model
        if self.config.tie_embeddings:
            self.embed_tokens.weight.normal_(0.0, d**-0.5, generator=gen)
        else:
            self.embed_tokens.weight.normal_(0.0, 1.0, generator=gen)
            if self.config.num_labels:
                self.score.weight.zero_()
            else:
                self.lm_head.weight.normal_(0.0, 0.001, generator=gen)
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                bound = (3.0 / lin.in_features) ** 0.5
                lin.weight.uniform_(-bound, bound, generator=gen)
            attn.o_proj.weight.zero_()
            mlp.down_proj.weight.zero_()
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(self, ids: torch.Tensor | None, kv_cache: KVCache | None = None, *,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V) in fp32 (a scorer: scores (B, T, num_labels)). With a cache, ids
        continue the cached sequences. `inputs_embeds` (B, T, d_model) replaces the embedding of ids (ids None):
        a gradient with respect to a one-hot choice of tokens flows through it (llmlab.redteam.gcg)."""
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of ids and inputs_embeds")
        x = self.embed_tokens(ids) if ids is not None else inputs_embeds  # (B, T, d)
        T = x.shape[1]
        start = kv_cache.reach if kv_cache is not None else 0
        if start + T > self.config.context_len:
            raise LLMLabError(f"sequence of {start + T} tokens exceeds the model's context of {self.config.context_len}")
        if kv_cache is not None:
            positions, mask = kv_cache.positions(T), kv_cache.attn_mask(T)
        else:
            positions, mask = torch.arange(T, device=x.device), None
        cos, sin = self.rotary(positions)
        for block in self.layers:
            x = block(x, cos, sin, kv_cache, mask)
        logits = (self.score if self.config.num_labels else self.lm_head)(self.norm(x))  # (B, T, V or num_labels)
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits.float()

    # ---- sizes and costs -------------------------------------------------------------------------------

    def num_params(self, embedding: bool = True) -> int:
        """Parameters (a tied head is counted once); without the input embedding when embedding=False."""
        n = sum(p.numel() for p in self.parameters())
        if not embedding and not self.config.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x (matmul parameters, LM head included) + 12 x layers x context x d_model
        for attention scores and values (Kaplan et al. 2020; the PaLM paper's MFU appendix)."""
        cfg = self.config
        T = seq_len or cfg.context_len
        matmul = sum(p.numel() for name, p in self.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
        if cfg.tie_embeddings:
            matmul += self.lm_head.weight.numel()  # the head is a matmul even when it shares the embedding
        return 6 * matmul + 12 * cfg.n_layer * T * cfg.n_head * cfg.hdim
