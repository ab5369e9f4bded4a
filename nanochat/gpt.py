"""
The GPT, nanochat style:
- rotary position embeddings (no learned positions), QK-norm, group-query attention ready
- relu^2 MLP, untied embedding and lm_head, logit softcap, no biases
- RMSNorm without learnable parameters (functional)
- optional Mixture-of-Experts in place of the MLP (use_moe; every moe_freq-th layer)
- optional multi-token prediction heads (mtp_heads; training only)
- optional Mixture-of-Depths (mod_capacity; every mod_freq-th block; see nanochat/mod.py)
- optional Mamba-2 layers in place of attention (layer_pattern; see nanochat/mamba.py)
- optional pieces of nanochat's current model, each off by default (see GPTConfig): value
  embeddings, per-layer residual/x0 scalars, smear, backout, sliding windows (attention,
  rotary and windows live in nanochat/attention.py), rotary base, q/k scale, vocab padding,
  init scales, weights cast to the activation dtype
"""

from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import (CausalSelfAttention, CastLinear, has_value_embed, layer_windows,
                                linear_class, norm, precompute_rotary)
from nanochat.mamba import Mamba2
from nanochat.moe import MoE, moe_layers, relu2
from nanochat.mod import (MoDRouter, mod_tokens, topk_positions, gather_positions, scatter_positions, gather_rotary,
                          straight_through_gate, causal_stats)

SMEAR_GATE_CHANNELS = 24  # the smear gate reads the first 24 channels of the token's embedding


# The value each architecture field had before it existed, for configs saved without it.
SAVED_WITHOUT = dict(value_embeds=False, layer_lambdas=False, smear=False, backout=False, window_pattern="L",
                     rotary_base=1e4, qk_scale=1.0, vocab_pad=1, embedding_init_std=1.0, fc_init_scale=1.0, cast_weights=False)


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12      # query heads (head dim n_embd / n_head = 64)
    n_kv_head: int = 12   # key/value heads (GQA when < n_head)
    n_embd: int = 768
    # MoE (contract): every moe_freq-th layer (1 = all) swaps its MLP for top-k of n_experts,
    # each of hidden width expert_hidden_mult * n_embd. The dense MLP is 4 * n_embd wide, so
    # (expert_topk + n_shared_experts) * expert_hidden_mult == 4 is iso-FLOPs with the dense
    # model (+ the router): 2.0 for the default top-2.
    use_moe: bool = False
    n_experts: int = 8
    expert_topk: int = 2
    moe_freq: int = 1
    expert_hidden_mult: float = 2.0
    # Routing variants (see nanochat/moe.py): softmax|sigmoid scores, a scale on the combine
    # weights, always-on shared experts, the aux-loss-free balancing bias's update rate per
    # optimizer step (0 = no updates; a trained bias is still used to choose), and a capacity
    # factor (0 = dropless). Defaults: sigmoid scores balanced by the aux-free bias (DeepSeek-V3),
    # chosen by the techmix study (dev/LOG.md 2026-11-26): the loss of softmax + Switch within
    # seed noise, load CV ~0.1 instead of ~0.5, faster steps. Switch instead: router="softmax",
    # aux_free_bias=0, balance_loss_coeff=0.01.
    router: str = "sigmoid"
    route_scale: float = 1.0
    n_shared_experts: int = 0
    aux_free_bias: float = 0.01
    capacity_factor: float = 0.0
    # Loss weights of a training step (GPT.training_loss): the Switch balance loss and the
    # router z-loss (ST-MoE), each per MoE layer, and the mean MTP head loss (DeepSeek-V3 starts
    # at 0.3). Training-time choices: they do not change the function the weights compute.
    balance_loss_coeff: float = 0.0
    router_z_loss: float = 0.0
    mtp_weight: float = 0.3
    # Multi-token prediction (Gloeckle et al. 2024): mtp_heads extra heads, head i predicting
    # token t+1+i from the trunk's last hidden state through its own dense transformer block
    # and the shared lm_head. Training only: logits, val bpb and generation are next-token.
    # Parallel heads rather than DeepSeek-V3's sequential modules: each head needs only the
    # trunk's state, so heads are independent and cheap to add; the sequential chain (each
    # module also reads the embedding of the token it was told) is worth wiring only if
    # these help at our scale (dev/LOG.md).
    mtp_heads: int = 0
    # Mixture-of-Depths (Raposo et al. 2024; nanochat/mod.py): every mod_freq-th block (layer i
    # when (i + 1) % mod_freq == 0) processes only round(mod_capacity * T) tokens of each
    # sequence in training, chosen by its router; 0 = off. Works with dense and MoE FFNs.
    mod_capacity: float = 0.0
    mod_freq: int = 2
    # Hybrid models: layer i mixes its tokens with attention ("A") or a Mamba-2 SSD layer ("M")
    # as layer_pattern[i % len(layer_pattern)] says ("AM": alternate; "A": attention only).
    # The FFN of every layer is still dense or MoE by use_moe/moe_freq. Mamba-2 shapes
    # (Dao & Gu 2024; nanochat/mamba.py): state size, inner width = expand * n_embd in heads
    # of mamba_head_dim, the chunk of the SSD scan, the depthwise conv's width.
    layer_pattern: str = "A"
    mamba_d_state: int = 64
    mamba_expand: int = 2
    mamba_head_dim: int = 64
    mamba_chunk: int = 64
    mamba_d_conv: int = 4
    # nanochat's model (MODEL_PRESETS["nanochat"] turns it all on; off = the model above, bit for bit).
    # Defaults: the pieces the nanochat study adopted (dev/LOG.md, 2026-12-06); see SAVED_WITHOUT.
    # value_embeds: ResFormer value residual (Zhou et al. 2024; modded-nanogpt): an extra
    # (padded_vocab, n_kv_head * head_dim) embedding per layer on alternating layers ending at
    # the last one, added to v through a per-kv-head gate 3 * sigmoid(W x[..., :12]); attention only.
    value_embeds: bool = True
    # layer_lambdas: before block i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (the normed embedding).
    layer_lambdas: bool = False
    # smear: the previous token's normed embedding added, weighted by smear_lambda * sigmoid(W e[..., :24]).
    smear: bool = False
    # backout: backout_lambda (init 0.2) x the residual after layer n_layer // 2, subtracted before the final norm.
    backout: bool = False
    # Sliding windows per layer, tiled: L = full, S = 128 * ceil(sequence_len / 512) (attention.layer_windows:
    # the last layer, Mamba layers and MoD-routed blocks are always full).
    window_pattern: str = "SSSL"
    rotary_base: float = 10000.0
    qk_scale: float = 1.2         # q and k multiplied by this after QK-norm (nanochat 1.2)
    vocab_pad: int = 1            # wte, lm_head, value embeddings padded to a multiple (nanochat 64)
    embedding_init_std: float = 1.0
    fc_init_scale: float = 1.0    # the first MLP matrix's (and experts') uniform bound x this (nanochat 0.4)
    # cast_weights: every linear casts its fp32 weight to the activation's dtype, and the
    # embeddings are cast to the model's compute_dtype (GPT.set_compute_dtype; bf16 on CUDA):
    # nanochat's replacement for autocast. Off: autocast decides.
    cast_weights: bool = False

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_saved(cls, saved):
        """A checkpoint's config; a field it lacks (saved before the field existed) takes its SAVED_WITHOUT value."""
        return cls(**{**SAVED_WITHOUT, **saved})

    def is_moe_layer(self, layer_idx):
        # moe_freq=2 -> layers 1, 3, 5, ... are MoE (every other FFN, as in GShard/Switch).
        return self.use_moe and (layer_idx + 1) % self.moe_freq == 0

    def is_mamba_layer(self, layer_idx):
        return self.layer_pattern[layer_idx % len(self.layer_pattern)] == "M"

    def is_mod_layer(self, layer_idx):
        # mod_freq=2 -> blocks 1, 3, 5, ... are routed (every other block, as in Raposo et al.).
        return self.mod_capacity > 0 and (layer_idx + 1) % self.mod_freq == 0

    def has_value_embed(self, layer_idx):
        return self.value_embeds and not self.is_mamba_layer(layer_idx) and has_value_embed(layer_idx, self.n_layer)

    def padded_vocab_size(self):
        return -(-self.vocab_size // self.vocab_pad) * self.vocab_pad


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        Linear = linear_class(config)
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(relu2(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx, dense=False):
        super().__init__()
        self.layer_idx = layer_idx
        # the token mixer: attention, or Mamba-2 where the layer pattern says so (dense=True,
        # an MTP head: always attention)
        self.is_mamba = config.is_mamba_layer(layer_idx) and not dense
        if self.is_mamba:
            self.mamba = Mamba2(config)
        else:  # an MTP head: full attention, no value embedding
            window = None if dense else layer_windows(config)[layer_idx]
            self.attn = CausalSelfAttention(config, layer_idx, value_embed=config.has_value_embed(layer_idx) and not dense,
                                            window=window)
        self.is_moe = config.is_moe_layer(layer_idx) and not dense
        self.mlp = MoE(config) if self.is_moe else MLP(config)
        # Mixture-of-Depths: a routed block has a router and a causal threshold (nanochat/mod.py)
        self.mod = MoDRouter(config.n_embd) if config.is_mod_layer(layer_idx) and not dense else None
        assert not (self.mod is not None and self.is_mamba), "a Mamba layer cannot be a MoD-routed block"
        assert not (self.mod is not None and self.attn.window is not None), "a MoD-routed block attends with full context"
        self.mod_capacity = config.mod_capacity
        self.mod_rule = "auto"  # auto: top-k in training, the causal threshold in eval; "topk": top-k always

    def _residual(self, x, cos_sin, kv_cache=None, gate=None, select=None, ve=None):
        """x + attn, then + FFN; gate (B, T, 1) multiplies both residual branches (MoD)."""
        scale = (lambda y: y) if gate is None else (lambda y: gate * y)
        x = x + scale(self._mamba(norm(x), kv_cache) if self.is_mamba else self.attn(norm(x), cos_sin, kv_cache, select, ve))
        if self.is_moe:  # MoE layers need nothing for a KV cache: routing is per token
            y, moe_losses = self.mlp(norm(x))
            return x + scale(y), moe_losses
        return x + scale(self.mlp(norm(x))), None

    def _mamba(self, xn, kv_cache):
        """Mamba-2 mixing; with a cache the layer continues (and replaces) its recurrent state."""
        if kv_cache is None:
            return self.mamba(xn)
        state = kv_cache.mamba_state(self.layer_idx)
        if state is None:
            state = self.mamba.new_state(xn.size(0), xn.device, xn.dtype)
        y, state = self.mamba(xn, state=state)
        kv_cache.set_mamba_state(self.layer_idx, state)
        return y

    def forward(self, x, cos_sin, kv_cache=None, ve=None):
        """ve: this layer's value embeddings (B, T, kv width) or None.
        Returns (x, MoE losses or None, MoD statistics (2,) or None)."""
        if self.mod is None:
            return (*self._residual(x, cos_sin, kv_cache, ve=ve), None)
        xn = norm(x)
        if self.training or self.mod_rule == "topk":
            # top-k of each sequence: static shapes (k is fixed by T), not causal
            assert kv_cache is None, "top-k routing needs the whole sequence: no KV cache"
            scores = self.mod.scores(xn)
            k = mod_tokens(x.size(1), self.mod_capacity)
            positions = topk_positions(scores, k)
            chosen = scores.gather(1, positions)
            if self.training:
                self.mod.record_cut(scores, k)
            gate = straight_through_gate(chosen).unsqueeze(-1).to(x.dtype)
            ve = None if ve is None else gather_positions(ve, positions)
            out, moe_losses = self._residual(gather_positions(x, positions), gather_rotary(cos_sin, positions), gate=gate, ve=ve)
            return scatter_positions(x, positions, out), moe_losses, causal_stats(scores, positions, self.mod.threshold)
        # the causal rule: a token is processed when its own score clears the calibrated threshold
        select = self.mod.scores(xn) > self.mod.threshold
        if kv_cache is not None and not bool(select.any()):  # inference only (a host sync): skip the block
            return x, None, None
        out, _ = self._residual(x, cos_sin, kv_cache, select=select, ve=ve)
        return torch.where(select.unsqueeze(-1), out, x), None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # the vocabulary padded to a multiple of vocab_pad (tensor-core friendly shapes); the
        # padding rows are never looked up, and forward crops the logits to vocab_size
        vocab = config.padded_vocab_size()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = linear_class(config)(config.n_embd, vocab, bias=False)
        # MTP heads: dense blocks (an MoE head would add routing to a training-only extra).
        self.mtp = nn.ModuleList([Block(config, config.n_layer + i, dense=True) for i in range(config.mtp_heads)])
        head_dim = config.n_embd // config.n_head
        if config.value_embeds:
            kv_dim = config.n_kv_head * head_dim
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim)
                                               for i in range(config.n_layer) if config.has_value_embed(i)})
        if config.layer_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = linear_class(config)(SMEAR_GATE_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        if config.cast_weights:  # every linear of the blocks too (MoE shared experts, MoD routers' modules)
            for module in self.modules():
                if type(module) is nn.Linear:
                    module.__class__ = CastLinear
        # cast_weights: the dtype the embeddings are cast to (None: the weights' own, fp32)
        self.compute_dtype = None
        # Rotary tables for 10x the training length, so generation can run past it.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = precompute_rotary(self.rotary_seq_len, head_dim, config.rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: unit-normal embeddings, a tiny lm_head, uniform input projections
        with the std of a unit-variance fan-in init, and zero output projections so every
        block starts as the identity. Experts start like the dense MLP; the router with small
        random weights (MoE.init_weights: near-uniform scores, but tokens spread over experts)."""
        cfg = self.config
        self.apply(self._init_linear)
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=cfg.embedding_init_std)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * cfg.n_embd**-0.5  # uniform(-s, s) has std n_embd^-0.5
        for block in [*self.transformer.h, *self.mtp]:  # an MTP head starts as the identity on the trunk
            if block.is_mamba:
                block.mamba.init_weights()  # Mamba-2's init; zero output projection
            else:
                for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                    torch.nn.init.uniform_(lin.weight, -s, s)
                torch.nn.init.zeros_(block.attn.c_proj.weight)
            if block.mod is not None:
                block.mod.init_weights()
            if block.is_moe:
                block.mlp.init_weights()  # experts like the MLP below; a small random router
                if cfg.fc_init_scale != 1.0:  # uniform(-s, s) x c = uniform(-cs, cs): experts start like the MLP
                    for w in (block.mlp.w_fc, *([block.mlp.shared_fc.weight] if block.mlp.n_shared else [])):
                        w.mul_(cfg.fc_init_scale)
            else:
                torch.nn.init.uniform_(block.mlp.c_fc.weight, -s * cfg.fc_init_scale, s * cfg.fc_init_scale)
                torch.nn.init.zeros_(block.mlp.c_proj.weight)
        # nanochat's inits of its extra pieces (after the blocks, so the blocks' draws are unchanged)
        n = cfg.n_layer
        if cfg.layer_lambdas:
            # a stronger residual and more of x0 early, decaying linearly with depth
            layer = torch.arange(n, dtype=torch.float32, device=self.resid_lambdas.device) / max(n - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * layer)
            self.x0_lambdas.copy_(0.20 - 0.15 * layer)
        if cfg.smear:
            torch.nn.init.zeros_(self.smear_lambda)  # smear starts off; the gate is small and positive
            torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        if cfg.backout:
            torch.nn.init.constant_(self.backout_lambda, 0.2)
        if cfg.value_embeds:
            for ve in self.value_embeds.values():  # like c_v: uniform with the same std
                torch.nn.init.uniform_(ve.weight, -s, s)
            for block in self.transformer.h:  # gates slightly above neutral: 3 * sigmoid(~0) = 1.5
                if not block.is_mamba and block.attn.ve_gate is not None:
                    torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        head_dim = cfg.n_embd // cfg.n_head
        cos, sin = precompute_rotary(self.rotary_seq_len, head_dim, cfg.rotary_base, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def set_compute_dtype(self, dtype):
        """cast_weights: the activations' dtype from the embedding on (bf16 on CUDA, as nanochat's
        COMPUTE_DTYPE); every linear casts its fp32 weight to it. No autocast around the model then."""
        assert self.config.cast_weights, "set_compute_dtype is for cast_weights models (others use autocast)"
        self.compute_dtype = dtype

    @staticmethod
    def _init_linear(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)

    # ------------------------------------------------------------------ parameter roles

    # What each role means to the optimizer (nanochat/optim.py reads this; nothing else decides):
    #   embedding, lm_head  AdamW, lrs scaled by 1/sqrt(d/768) (lookups and the classifier)
    #   matrix              Muon: hidden 2-D weights and stacked (E, out, in) expert weights
    #   router              AdamW at the router lr: MoE gates and MoD routers (small classifiers
    #                       whose rows should move at their own gradients' rate; see optim.py)
    #   conv                AdamW at the scalar lr: Mamba-2's depthwise conv (not a matrix)
    #   no_decay            AdamW at the scalar lr, never weight-decayed: Mamba-2's A_log, D,
    #                       dt_bias (the reference marks them _no_weight_decay)
    #   value_embedding     the value embeddings (lookups; nanochat: AdamW at 0.5x the embedding lr)
    #   resid_lambdas       per-layer residual scales (nanochat: AdamW, 0.01x the scalar lr)
    #   x0_lambdas          per-layer x0 weights (nanochat: AdamW at the scalar lr, beta1 0.96)
    #   smear_backout       smear_gate.weight, smear_lambda, backout_lambda (nanochat: AdamW, lr 0.2)
    # The value-embedding gates (blocks' attn.ve_gate) are matrices, with the block's other
    # weights, as nanochat's optimizer groups every transformer.h parameter for Muon.
    ROLES = ("embedding", "lm_head", "matrix", "router", "conv", "no_decay", "value_embedding", "resid_lambdas",
             "x0_lambdas", "smear_backout")

    def param_roles(self):
        """{role: [parameters]}, every parameter in exactly one role. Each block's modules
        declare their own (MoE, MoDRouter, Mamba2 have param_roles); a module without one is all
        matrices (attention, the dense MLP). A new parameter gets its role here, once."""
        roles = {role: [] for role in self.ROLES}
        roles["embedding"].append(self.transformer.wte.weight)
        roles["lm_head"].append(self.lm_head.weight)
        cfg = self.config
        if cfg.value_embeds:
            roles["value_embedding"].extend(ve.weight for ve in self.value_embeds.values())
        if cfg.layer_lambdas:
            roles["resid_lambdas"].append(self.resid_lambdas)
            roles["x0_lambdas"].append(self.x0_lambdas)
        roles["smear_backout"].extend(self._smear_backout_params())
        for block in [*self.transformer.h, *self.mtp]:
            for module in block.children():
                declared = module.param_roles() if hasattr(module, "param_roles") else {"matrix": list(module.parameters())}
                for role, params in declared.items():
                    roles[role].extend(params)
        assigned = [p for params in roles.values() for p in params]
        assert len(assigned) == len({id(p) for p in assigned}) == len(list(self.parameters())), \
            "every parameter needs exactly one role (GPT.param_roles)"
        return roles

    def _smear_backout_params(self):
        cfg = self.config
        return ([self.smear_gate.weight, self.smear_lambda] if cfg.smear else []) + ([self.backout_lambda] if cfg.backout else [])

    def training_loss(self, ce, aux):
        """The loss a training step minimises, from forward's (cross_entropy, aux): the
        next-token loss + balance_loss_coeff x the balance loss + router_z_loss x the z-loss
        (both sums over MoE layers, so each layer's router feels the full coefficient) +
        mtp_weight x the mean MTP head loss. The coefficients are the config's."""
        cfg = self.config
        loss = ce
        if cfg.use_moe:
            loss = loss + cfg.balance_loss_coeff * aux["balance_loss"] + cfg.router_z_loss * aux["z_loss"]
        if cfg.mtp_heads:
            loss = loss + cfg.mtp_weight * aux["mtp_losses"].mean()
        return loss

    # ------------------------------------------------------------------ accounting

    def num_scaling_params(self):
        """Parameter counts (contract): total, moe_inactive (the experts a token does not use:
        per MoE layer (n_experts - expert_topk) x one routed expert) and active_total, plus
        parts. Shared experts run for every token: they are active, never inactive.
        data_ratio_params: what --target-param-data-ratio multiplies, active_total without the
        embedding (a lookup) and the MTP heads (training only: the model they train has none).
        value_embeds: parameters without matmul FLOPs (lookups, as wte): in total and
        active_total (every token reads its rows), out of data_ratio_params and FLOPs; with the
        scalars (resid/x0 lambdas, smear gate and lambda, backout lambda) also out of
        data_ratio_params, so for a dense model it is nanochat's scaling count exactly:
        transformer matrices (the ve gates included) + lm_head (padded).
        adamw: the parameters AdamW keeps two moments for (every role but "matrix", Muon's)."""
        cfg = self.config
        counts = {"wte": self.transformer.wte.weight.numel(), "lm_head": self.lm_head.weight.numel(),
                  "attn": 0, "mlp": 0, "experts": 0, "shared_experts": 0, "router": 0, "moe_inactive": 0,
                  "mtp": sum(p.numel() for p in self.mtp.parameters()), "mod": 0, "mamba": 0,
                  "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()) if cfg.value_embeds else 0,
                  "scalars": (2 * cfg.n_layer if cfg.layer_lambdas else 0)
                  + sum(p.numel() for p in self._smear_backout_params())}
        for block in self.transformer.h:
            if block.is_mamba:
                counts["mamba"] += sum(p.numel() for p in block.mamba.parameters())
            else:
                counts["attn"] += sum(p.numel() for p in block.attn.parameters())
            if block.mod is not None:  # MoD routers: active (every token is scored)
                counts["mod"] += sum(p.numel() for p in block.mod.parameters())
            if block.is_moe:
                moe = block.mlp.param_counts()
                for key in ("experts", "shared_experts", "router"):
                    counts[key] += moe[key]
                counts["moe_inactive"] += moe["inactive"]
            else:
                counts["mlp"] += sum(p.numel() for p in block.mlp.parameters())
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["active_total"] = counts["total"] - counts["moe_inactive"]
        counts["data_ratio_params"] = (counts["active_total"] - counts["wte"] - counts["mtp"] - counts["value_embeds"]
                                       - counts["scalars"])
        counts["adamw"] = sum(p.numel() for role, params in self.param_roles().items() if role != "matrix" for p in params)
        return counts

    def estimate_flops(self):
        """Training FLOPs per token, active parameters only (contract): 6 per active matmul
        weight (2 forward, 4 backward; the embedding is a lookup, not a matmul) plus the
        attention scores/values term 12 * n_head * head_dim * seq_len per layer (Kaplan et al.
        2020 / PaLM appendix B, as nanochat counts it). MTP heads: their blocks' weights and
        attention like a layer's, plus the shared lm_head once more per head (its matmul runs
        again on each head's hidden state). A MoD block runs on k = mod_tokens(T, C) of every T
        tokens, and its attention spans k: (k/T) * (6 * its active weights + 12 * n_head *
        head_dim * k), plus its router on every token (MoDRouter.flops_per_token). A Mamba layer:
        its FFN as usual plus Mamba2.flops_per_token (projections, conv and the chunked SSD
        scan, counted by our algorithm), no attention term.
        nanochat's pieces: a sliding-window layer's attention term spans min(W, seq_len) keys per
        query, as nanochat counts it (W + 1 are attended: nanochat/attention.py); value
        embeddings and the per-layer scalars are lookups and elementwise products, no FLOPs
        counted (as nanochat: 6 x the weights of its Linear modules only); the ve gates (in the
        blocks' attention) and the smear gate are matmul weights and count 6 each; a padded
        lm_head counts its padded rows (they are computed)."""
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        attention = lambda span: 12 * cfg.n_head * head_dim * span
        lm_head = self.lm_head.weight.numel()
        flops = 6 * lm_head * (1 + cfg.mtp_heads)
        if cfg.smear:
            flops += 6 * self.smear_gate.weight.numel()
        flops += sum(6 * sum(p.numel() for p in head.parameters()) + attention(cfg.sequence_len) for head in self.mtp)
        for block in self.transformer.h:
            mixer = [] if block.is_mamba else list(block.attn.parameters())  # Mamba: flops_per_token below
            active = sum(p.numel() for p in [*mixer, *block.mlp.parameters()])
            if block.is_moe:
                active -= block.mlp.param_counts()["inactive"]
            if block.is_mamba:
                flops += 6 * active + block.mamba.flops_per_token(cfg.sequence_len)
            elif block.mod is None:
                window = block.attn.window
                flops += 6 * active + attention(cfg.sequence_len if window is None else min(window, cfg.sequence_len))
            else:
                k = mod_tokens(cfg.sequence_len, cfg.mod_capacity)
                flops += k / cfg.sequence_len * (6 * active + attention(k)) + block.mod.flops_per_token()
        return flops

    def num_moe_layers(self):
        return sum(1 for block in self.transformer.h if block.is_moe)

    def mamba_layers(self):
        return [i for i, block in enumerate(self.transformer.h) if block.is_mamba]

    def mod_layers(self):
        return [i for i, block in enumerate(self.transformer.h) if block.mod is not None]

    def set_mod_rule(self, rule):
        """MoD blocks' routing outside training: "auto" (the causal threshold in eval mode) or
        "topk" (top-k of the whole sequence even in eval: not causal, a diagnostic only)."""
        assert rule in ("auto", "topk"), rule
        for i in self.mod_layers():
            self.transformer.h[i].mod_rule = rule

    # ------------------------------------------------------------------ forward

    def forward(self, idx, targets=None, loss_reduction="mean", kv_cache=None):
        """idx: (B, T) token ids. Without targets: returns logits (B, T, V), fp32.
        With targets: returns (cross_entropy, aux) where aux = {"balance_loss", "z_loss",
        "mtp_losses"}: the Switch balance loss and router z-loss, each the SUM over MoE layers
        (zero tensors for dense models), and the (mtp_heads,) MTP head losses (empty unless
        training with heads); the trainer weights and adds them, so every layer's router feels the
        full coefficient, as in Switch (Mesh-TF), GShard, DeepSeek and Megatron. Targets of -1 are ignored.
        kv_cache (inference, see nanochat/engine.py): idx are the tokens that follow the ones
        already cached; their rotary positions start at the cache position, and their keys and
        values are appended to the cache (and, with smear, the last token's embedding kept)."""
        B, T = idx.shape
        cfg = self.config
        t0 = 0 if kv_cache is None else kv_cache.get_pos()
        assert t0 + T <= self.cos.size(1), f"sequence length {t0 + T} exceeds rotary cache {self.cos.size(1)}"
        cos_sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        x = self.transformer.wte(idx)
        if cfg.cast_weights and self.compute_dtype is not None:  # the whole forward in compute_dtype
            x = x.to(self.compute_dtype)
            cos_sin = tuple(t.to(x.dtype) for t in cos_sin)
        x = norm(x)
        if cfg.smear:
            x = self._smear(x, kv_cache)
        x0 = x
        mid = cfg.n_layer // 2  # backout: the residual after this layer
        x_mid = None
        moe_losses, mod_stats = [], []
        for i, block in enumerate(self.transformer.h):
            if cfg.layer_lambdas:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if cfg.has_value_embed(i) else None
            x, layer_losses, layer_mod = block(x, cos_sin, kv_cache, ve)
            if layer_losses is not None:
                moe_losses.append(layer_losses)
            if layer_mod is not None:
                mod_stats.append(layer_mod)
            if cfg.backout and i == mid:
                x_mid = x
        if cfg.backout:  # the lm_head (and the MTP heads) read the backed-out state
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self._logits(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(B, T)
        aux = {name: torch.stack([m[name] for m in moe_losses]).sum() if moe_losses else logits.new_zeros(())
               for name in ("balance_loss", "z_loss")}
        # MTP: head i (1-based) reads the trunk's last hidden state and predicts token t+1+i.
        # Computed in training only (evaluation is next-token); (N,) mean losses, one per head.
        mtp = []
        if self.training:
            for i, head in enumerate(self.mtp, start=1):
                h, _, _ = head(x, cos_sin)
                head_logits = self._logits(h)
                mtp.append(F.cross_entropy(head_logits.view(-1, head_logits.size(-1)),
                                           mtp_targets(targets, i).reshape(-1), ignore_index=-1))
        aux["mtp_losses"] = torch.stack(mtp) if mtp else logits.new_zeros(0)
        # MoD (top-k routing, i.e. training): (n_mod, 2) per routed block = [fraction of tokens
        # the causal rule would process, its agreement with the top-k]; no gradient
        aux["mod_stats"] = torch.stack(mod_stats) if mod_stats else logits.new_zeros(0, 2)
        return loss, aux

    def _smear(self, x, kv_cache):
        """x_t + smear_lambda * sigmoid(W x_t[..., :24]) * x_(t-1) on the normed embeddings; a
        sequence's first token has no previous one. With a cache, the previous token of the first
        new one is the cache's (the last embedding the previous forward saw), so prefill, chunks
        and decode steps compute what one full forward does. (nanochat's cached path smears a
        multi-token chunk only within itself: the same wherever its engine uses it, a prefill into
        an empty cache, but not for a chunk after a cached prefix.)"""
        lam = self.smear_lambda.to(x.dtype)
        prev = None
        if kv_cache is not None:
            prev = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:]
        if prev is None:
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_GATE_CHANNELS]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
        return x + gate * torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)

    def _logits(self, x):
        softcap = 15.0  # smoothly bounds logits to (-15, 15): stabilises early training
        logits = self.lm_head(norm(x))
        if logits.size(-1) != self.config.vocab_size:  # the padding rows are not tokens
            logits = logits[..., :self.config.vocab_size]
        logits = logits.float()
        return softcap * torch.tanh(logits / softcap)


def mtp_targets(targets, i):
    """Targets of MTP head i: targets[:, t + i] (the next-token targets shifted i left, so
    token t+1+i), -1 (ignored) where that falls past the end of the row."""
    return torch.cat([targets[:, i:], targets.new_full((targets.size(0), min(i, targets.size(1))), -1)], dim=1)


def build_model(config, device, expert_shard=None):
    """Build on the meta device (no memory, no init cost), materialise on `device`, init.
    expert_shard=(ep_rank, ep_size): expert parallelism, keep only this rank's block of every
    MoE layer's experts; the whole model never exists on this rank (one layer's experts do,
    briefly, while they are drawn), and the weights equal the same block of the whole model's."""
    model = meta_model(config)
    if expert_shard is not None:
        for m in moe_layers(model):
            m.keep_local_experts(*expert_shard)
    model.to_empty(device=device)
    model.init_weights()
    return model


def meta_model(config):
    """The whole model on the meta device: shapes without memory, for counting parameters and
    FLOPs when a rank holds only part of it (expert parallelism)."""
    with torch.device("meta"):
        return GPT(config)
