"""
Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs", arXiv:2405.21060), plain PyTorch.

The selective SSM per head (scalar decay per head, "SSD"; paper section 3/6):
    h_t = exp(A_t) * h_{t-1} + X_t (x) B_t        (state h: P x N, outer product)
    y_t = h_t . C_t                                (contract the state dimension N)
with A_t = dt_t * A <= 0 and X_t = dt_t * x_t. Training runs the chunked "SSD" algorithm
(paper section 7, "minimal SSD"): only matmuls/einsums, so it compiles and runs anywhere.
Decoding one token runs the recurrence above directly (O(1) per token, like an RNN).
One group (ngroups = 1): B and C are shared by all heads.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def segsum(x):
    """out[..., i, j] = x[..., j+1] + ... + x[..., i] for i >= j, -inf above the diagonal.

    exp(segsum(A)) is the decay matrix L of the paper (eq. 4 / section 6): L[i, j] is the
    total decay from step j to step i, and 0 for j > i (causality). We sum the masked
    entries directly rather than take differences of one cumulative sum: cumsum(i) -
    cumsum(j) cancels catastrophically once the sums get long (the inter-chunk scan spans
    the whole sequence)."""
    T = x.size(-1)
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = x.unsqueeze(-1).expand(*x.shape, T)            # xx[..., i, j] = x[..., i]
    xx = xx.masked_fill(~strict, 0.0)                   # keep x_i only where i > j
    out = torch.cumsum(xx, dim=-2)                       # sum over j < k <= i
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return out.masked_fill(~causal, float("-inf"))


def ssd_chunked(X, A, B, C, chunk, initial_state=None):
    """Chunked SSD scan. X (b, l, h, p) already times dt; A (b, l, h) already dt * A (log-decays
    <= 0); B, C (b, l, n) shared over heads; initial_state (b, h, p, n) or None (zeros).
    Returns Y (b, l, h, p) in X's dtype and the fp32 state after the last token (b, h, p, n).

    Work is in fp32: decays are products of many exp(A) factors, bf16's 8 mantissa bits
    are too coarse for them, and the states are sums over the whole sequence (the reference
    kernels keep the states and the pass between chunks in fp32 too). Autocast is switched
    off inside: every einsum here is a matmul, which bf16 autocast would run in bf16 even on
    fp32 operands (measured on CPU: 4.7e-3 relative error in the final state at l = 256)."""
    with torch.autocast(device_type=X.device.type, enabled=False):
        return _ssd_chunked_fp32(X, A, B, C, chunk, initial_state)


def _ssd_chunked_fp32(X, A, B, C, chunk, initial_state):
    b, l, h, p = X.shape
    out_dtype = X.dtype
    X, A, B, C = X.float(), A.float(), B.float(), C.float()
    Q = min(chunk, l)                 # a short sequence (e.g. a small prefill) is one chunk
    c = -(-l // Q)                    # number of chunks (ceil)
    pad = c * Q - l
    if pad:  # static per shape, so no graph break under torch.compile(dynamic=False)
        # Padded steps have decay exp(0) = 1 and input X (x) B = 0, so h_t = h_{t-1}: the
        # state after the padding is exactly the state after the last real token. Zero C
        # makes their outputs 0; they are cut off anyway.
        X, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (X, B, C))
        A = F.pad(A, (0, 0, 0, pad))
    X = X.view(b, c, Q, h, p)
    B = B.view(b, c, Q, -1)
    C = C.view(b, c, Q, -1)
    A = A.view(b, c, Q, h).permute(0, 3, 1, 2)          # (b, h, c, Q)
    A_cum = torch.cumsum(A, dim=-1)                      # decay from chunk start, per position

    # 1) within each chunk: the quadratic "attention" form Y = (L o C B^T) X (paper eq. 16).
    L = torch.exp(segsum(A))                             # (b, h, c, Q, Q)
    scores = torch.einsum("bcln,bcsn->bcls", C, B)       # shared by heads (one group)
    Y_diag = torch.einsum("bhcls,bcshp->bclhp", scores.unsqueeze(1) * L, X)

    # 2) each chunk's own final state, as if it started from zero: sum_s decay(s->end) X_s B_s.
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)    # (b, h, c, Q)
    Xd = X * decay_to_end.permute(0, 2, 3, 1).unsqueeze(-1)
    states = torch.einsum("bcsn,bcshp->bchpn", B, Xd)    # (b, c, h, p, n)

    # 3) scan across chunks: state entering chunk z = sum over earlier boundaries, decayed by
    # the total decay between them. c is small (l / Q), so this (c+1)^2 matmul is cheap and
    # keeps everything parallel (paper section 7, step 3).
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, B.size(-1), device=X.device)
    states = torch.cat([initial_state.float().unsqueeze(1), states], dim=1)   # (b, c+1, h, p, n)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))            # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    # the final state is what a cache keeps: its own copy, not a view that keeps every chunk's alive
    entering, final_state = states[:, :-1], states[:, -1].clone()

    # 4) what the state entering a chunk contributes at each position: decayed, read out by C.
    decay_in = torch.exp(A_cum).permute(0, 2, 3, 1).unsqueeze(-1)             # (b, c, Q, h, 1)
    Y_off = torch.einsum("bcln,bchpn->bclhp", C, entering) * decay_in

    Y = (Y_diag + Y_off).reshape(b, c * Q, h, p)[:, :l]
    return Y.to(out_dtype), final_state


class Mamba2(nn.Module):
    """Mamba-2 mixer: in_proj -> causal depthwise conv + SiLU on (x, B, C) -> SSD -> gated
    RMSNorm -> out_proj (paper section 7 / figure 6, "parallel" block: all of z, x, B, C, dt
    come from one projection of the input)."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.d_inner = config.mamba_expand * d
        self.d_state = config.mamba_d_state
        self.head_dim = config.mamba_head_dim
        assert self.d_inner % self.head_dim == 0, "d_inner must be a multiple of mamba_head_dim"
        self.n_heads = self.d_inner // self.head_dim
        self.chunk = config.mamba_chunk
        self.d_conv = config.mamba_d_conv
        self.conv_dim = self.d_inner + 2 * self.d_state     # the conv runs over x, B and C
        self.in_proj = nn.Linear(d, 2 * self.d_inner + 2 * self.d_state + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, bias=True, padding=0)
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    @torch.no_grad()
    def init_weights(self):
        """Every parameter (the model is built on meta and then to_empty). Mamba-2's init for
        the SSM parameters; the output projection at zero so the layer starts as the identity on
        the residual stream, like the other output projections."""
        s = 3**0.5 * self.in_proj.in_features**-0.5     # uniform(-s, s) has std d^-0.5
        nn.init.uniform_(self.in_proj.weight, -s, s)
        nn.init.zeros_(self.out_proj.weight)
        bound = self.d_conv**-0.5
        nn.init.uniform_(self.conv1d.weight, -bound, bound)
        nn.init.zeros_(self.conv1d.bias)
        # A in [-16, -1] per head: a spread of memory lengths across heads.
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.D.fill_(1.0)
        # dt log-uniform in [1e-3, 1e-1], stored through the inverse of softplus so that
        # softplus(0 + dt_bias) = dt at init: inv_softplus(y) = y + log(1 - exp(-y)).
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def param_roles(self):
        """{role: [parameters]} for the optimizer: the in/out projections are matrices (Muon),
        the depthwise conv goes to AdamW (a (conv_dim, 1, K) filter per channel, not a matrix),
        and A_log, D and dt_bias are never weight-decayed (the Mamba reference marks them
        _no_weight_decay: decay toward 0 would pull every head to A = -1 and dt = softplus(0),
        erasing the spread of memory lengths set at init, and shrink the D skip)."""
        return {"matrix": [self.in_proj.weight, self.out_proj.weight],
                "conv": [self.conv1d.weight, self.conv1d.bias],
                "no_decay": [self.A_log, self.D, self.dt_bias]}

    def new_state(self, batch_size, device, dtype):
        """Zero state: (conv_state (b, conv_dim, K-1) in dtype, ssm_state (b, H, P, N) fp32)."""
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state, device=device, dtype=torch.float32)
        return conv, ssm

    def forward(self, x, state=None, return_state=False):
        """x (b, T, d). state: None (zeros) or (conv_state, ssm_state) that x continues.
        Returns y, or (y, new_state) when return_state or a state was given."""
        b, T, _ = x.shape
        H, P, N, K = self.n_heads, self.head_dim, self.d_state, self.d_conv
        z, xBC, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv_dim, H], dim=-1)
        # causal conv: the window of token t is the K-1 inputs before it (zeros at the start of
        # a sequence, the cached ones when continuing) and itself.
        past = xBC.new_zeros(b, self.conv_dim, K - 1) if state is None else state[0].to(xBC.dtype)
        conv_in = torch.cat([past, xBC.transpose(1, 2)], dim=-1)  # (b, conv_dim, K-1+T)
        # last K-1 pre-conv inputs, copied: a cache keeps them, and a view would keep the whole
        # (b, conv_dim, K-1+T) input of a prefill alive with them
        conv_state = conv_in[..., conv_in.size(-1) - (K - 1):].clone()
        decode = state is not None and T == 1
        if decode:  # the window is exactly conv_in: a dot product per channel
            xBC = (conv_in * self.conv1d.weight[:, 0, :]).sum(-1, keepdim=True) + self.conv1d.bias[:, None]
        else:
            xBC = self.conv1d(conv_in)
        xBC = F.silu(xBC).transpose(1, 2)                           # (b, T, conv_dim)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, N, N], dim=-1)
        xs = xs.reshape(b, T, H, P)
        dt = F.softplus(dt.float() + self.dt_bias)                  # (b, T, H), positive step sizes
        A = -torch.exp(self.A_log.float())                          # (H,), negative: a decay
        ssm = None if state is None else state[1]
        if decode:  # recurrent form: h = exp(dt A) h + dt x (x) B, y = h . C
            # in fp32 like the scan (autocast off: the read-out einsum would be a bf16 matmul)
            with torch.autocast(device_type=x.device.type, enabled=False):
                h = torch.exp(dt[:, 0] * A)[..., None, None] * ssm.float()
                h = h + (dt[:, 0, :, None] * xs[:, 0].float())[..., None] * Bm[:, 0, None, None, :].float()
                y = torch.einsum("bhpn,bn->bhp", h, Cm[:, 0].float()).unsqueeze(1)
        else:
            y, h = ssd_chunked(xs.float() * dt[..., None], dt * A, Bm, Cm, self.chunk, ssm)
        y = y + self.D.float()[:, None] * xs.float()                # skip connection D (per head)
        y = y.reshape(b, T, self.d_inner)
        # gated RMSNorm (Mamba-2 section 7.3): normalise after the gate, for stability at scale
        y = F.rms_norm(y * F.silu(z.float()), (self.d_inner,))
        y = self.out_proj(y.to(x.dtype))
        if return_state or state is not None:
            return y, (conv_state, h)
        return y

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward = 3x forward; 2 per multiply-add):
          6 * (in_proj + out_proj weights) + 6 * conv_dim * K                 (linears, conv)
          + 6 * M / seq_len, with Q = min(chunk, seq_len), c = ceil(seq_len / Q), and M the
          multiply-adds of ssd_chunked over the padded length c*Q:
            M = c*Q*Q*N                  C.B^T scores (shared by the heads: one group)
              + H * (c*Q*Q*P             L-weighted values (Y_diag)
                     + c*Q*P*N           chunk states
                     + (c+1)**2 * P*N    inter-chunk scan ((c+1)x(c+1) decay matmul)
                     + c*Q*P*N)          incoming state read out by C (Y_off)
        Elementwise work (softplus, exp, SiLU, gating, norm, the D skip) is not counted."""
        H, P, N, K = self.n_heads, self.head_dim, self.d_state, self.d_conv
        Q = min(self.chunk, seq_len)
        c = -(-seq_len // Q)
        M = c * Q * Q * N + H * (c * Q * Q * P + c * Q * P * N + (c + 1) ** 2 * P * N + c * Q * P * N)
        linears = self.in_proj.weight.numel() + self.out_proj.weight.numel()
        return 6 * linears + 6 * self.conv_dim * K + 6 * M / seq_len
