"""
The ops one MoE layer's forward+backward runs, with the bytes each reads and writes, on the bf16
path CUDA autocast takes (emulated on the CPU: the MoE's experts' dtype is forced to bf16, as
`torch.is_autocast_enabled("cuda")` makes it on a GPU). CPU timings of bf16 paths say nothing
about a GPU; op counts and bytes moved do. Run it in two trees to compare code versions:

    python -m dev.moe_ops                                    # this tree
    (cd /tmp/before && PYTHONPATH=. python -m dev.moe_ops)   # an exported older commit (its own dev/)

Bytes: every tensor argument and result of each aten op, by its dtype size (views count their
own extent); a lower bound of the memory traffic a kernel per op would have (eager mode).
--graph: instead, the ops of the forward and backward graphs torch.compile traces (aot_autograd,
before inductor fuses them), by op.
"""

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import nanochat.moe as moe_mod
from nanochat.gpt import GPTConfig


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls, self.bytes = defaultdict(int), defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--graph", action="store_true", help="count the ops of the compiled graphs instead")
    args = p.parse_args()
    bf16 = lambda x: torch.bfloat16
    for name in ("_autocast_dtype", "_compute_dtype"):  # whichever this version has
        if hasattr(moe_mod, name):
            setattr(moe_mod, name, bf16)
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=args.d, use_moe=True, n_experts=8, expert_topk=2, expert_hidden_mult=2, router="sigmoid")
    moe = moe_mod.MoE(cfg)
    moe.init_weights()
    with torch.no_grad():
        moe.w_proj.normal_(0, 0.02)
    x = F.rms_norm(torch.randn(1, args.tokens, args.d), (args.d,)).requires_grad_()
    step = lambda m: (lambda y, losses: (y.float().square().mean() + 0.0 * losses["balance_loss"]).backward())(*m(x))
    if args.graph:
        from torch._dynamo.backends.common import aot_autograd
        graphs = []

        def record(gm, example_inputs):
            graphs.append(defaultdict(int))
            for node in gm.graph.nodes:
                if node.op == "call_function":
                    graphs[-1][str(node.target).split(".")[1] if "." in str(node.target) else str(node.target)] += 1
            return gm.forward
        step(torch.compile(moe, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True))
        for title, g in zip(("forward", "backward"), graphs):
            print(f"{title} graph: {sum(g.values())} ops: " + ", ".join(f"{k} {v}" for k, v in sorted(g.items())))
        return
    counter = OpCounter()
    with counter:
        step(moe)
    rows = sorted(counter.calls, key=lambda k: -counter.bytes[k])
    total = sum(counter.bytes.values())
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, d={args.d}, top-2 of 8 at 2d, experts in bf16: "
          f"{sum(counter.calls.values())} aten ops, {total / 2**20:.1f} MiB touched")
    print(f"{'op':<32}{'calls':>6}{'MiB':>10}")
    for r in rows:
        print(f"{r:<32}{counter.calls[r]:>6}{counter.bytes[r] / 2**20:>10.2f}")


if __name__ == "__main__":
    main()
