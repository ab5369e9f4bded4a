"""
Does the router's logits matmul need full fp32, or would TF32 or bf16 operands (fp32
accumulation) choose the same experts? Emulated on the CPU, exactly as the GPU rounds:
TF32 keeps 10 mantissa bits of each operand (round to nearest even), bf16 7; the products of
such operands are exact in fp32 and are summed in fp32. Counts the tokens whose top-k set
changes against the fp32 logits, with the aux-free bias added as routing does.

    python -m dev.router_precision --run grow_moe            # a trained MoE's routers on its val data
    python -m dev.router_precision                           # + freshly initialised routers (near-ties)
"""

import argparse

import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig
from nanochat.moe import MoE, moe_layers


def round_mantissa(x, bits):
    """fp32 -> fp32 with only `bits` mantissa bits (round to nearest even): TF32 = 10, bf16 = 7."""
    drop = 23 - bits
    i = x.contiguous().view(torch.int32)
    lsb = (i >> drop) & 1
    i = (i + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
    return i.view(torch.float32)


def flips(x, w, bias, topk, router, bits):
    """(tokens whose fp32 choice differs from the fp64 one, tokens whose choice differs when both
    operands keep `bits` mantissa bits), of x's rows."""
    def choose(logits):
        scores = torch.sigmoid(logits) if router == "sigmoid" else torch.softmax(logits, dim=-1)
        return torch.topk(scores + bias, topk, dim=-1).indices.sort(dim=-1).values
    exact = choose(x.double() @ w.double().T).long()
    fp32 = choose(x @ w.T)
    low = choose(round_mantissa(x, bits) @ round_mantissa(w, bits).T)
    return int((fp32 != exact).any(-1).sum()), int((low != exact).any(-1).sum())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="", help="a trained MoE run (model tag): its routers on its validation batches")
    p.add_argument("--tokens", type=int, default=65536)
    args = p.parse_args()
    cases = []
    torch.manual_seed(0)
    # freshly initialised routers (logit std 0.1: every score near the others) on unit-RMS inputs
    for d, E in ((768, 8), (768, 64)):
        cfg = GPTConfig(n_embd=d, use_moe=True, n_experts=E, expert_topk=2)
        moe = MoE(cfg)
        moe.init_weights()
        x = F.rms_norm(torch.randn(args.tokens, d), (d,))
        cases.append((f"init d={d} E={E}", x, moe.router.weight.detach(), moe.expert_bias, 2, cfg.router))
    if args.run:
        from nanochat.checkpoint import load_model, resolve_checkpoint
        from nanochat.dataloader import data_loader
        from nanochat.dataset import list_shards, split_shards
        model, tok, meta = load_model(resolve_checkpoint(args.run), "cpu")
        inputs = {m: [] for m in moe_layers(model)}
        hooks = [m.register_forward_pre_hook(lambda mod, a: inputs[mod].append(a[0].reshape(-1, a[0].size(-1))))
                 for m in moe_layers(model)]
        T = model.config.sequence_len
        rows = max(1, args.tokens // T)
        val = split_shards(list_shards(meta["data_dir"]), "val")
        x, y, _ = next(data_loader(tok, val, rows, T, device="cpu", loop=False))
        with torch.no_grad():
            model.eval()
            model(x)
        for h in hooks:
            h.remove()
        for i, (m, xs) in enumerate(inputs.items()):
            cases.append((f"{args.run} layer {i}", torch.cat(xs).float(), m.router.weight.detach(), m.expert_bias,
                          m.topk, m.router_kind))
    print(f"{'routers':<28}{'tokens':>8}  {'fp32 vs fp64':>13}  {'TF32 vs fp64':>13}  {'bf16 vs fp64':>13}")
    for name, x, w, bias, k, router in cases:
        f32, tf32 = flips(x, w, bias, k, router, 10)
        _, bf16 = flips(x, w, bias, k, router, 7)
        n = x.size(0)
        print(f"{name:<28}{n:>8}  {f32:>6} {100 * f32 / n:5.2f}%  {tf32:>6} {100 * tf32 / n:5.2f}%  {bf16:>6} {100 * bf16 / n:5.2f}%")


if __name__ == "__main__":
    main()
