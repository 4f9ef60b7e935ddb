"""Associative-recall / multihop learnability probe with flexible text formats (own tokenizer).

A stand-alone loop used to choose the multihop task format and model settings (results/multihop/probes/README.md);
run from the repository root with implicit-hf installed, e.g.
  OMP_NUM_THREADS=2 python results/multihop/probes/probe.py --names pairs --fmt rhs --hops 1 3 --implicit ...
"""

import argparse
import itertools
import math
import random
import string
import time

import numpy as np
import torch

from implicit_hf.modeling import ImplicitConfig, ImplicitForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--names", default="letters")  # letters | pairs
p.add_argument("--fmt", default="lhs")  # lhs: "a=3" ; rhs: "3>a"
p.add_argument("--hops", type=int, nargs=2, default=[1, 1])
p.add_argument("--chains", type=int, default=4)
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--layers", type=int, default=3)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--steps", type=int, default=600)
p.add_argument("--wd", type=float, default=0.01)
p.add_argument("--implicit", action="store_true")
p.add_argument("--loops", type=int, nargs=2, default=[1, 1])
p.add_argument("--grad", default="unroll")
p.add_argument("--gsteps", type=int, default=4)
p.add_argument("--core", type=int, default=1)
p.add_argument("--prelude", type=int, default=1)
p.add_argument("--coda", type=int, default=1)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_hops", default="1")
p.add_argument("--eval_loops", default="1")
p.add_argument("--minutes", type=float, default=100)
p.add_argument("--order", default="interleaved")
p.add_argument("--warmup", type=int, default=50)
p.add_argument("--qstyle", default="pre")  # pre: "? q" ; post: "q > ?"
p.add_argument("--eval_every", type=int, default=100)
p.add_argument("--ramp", type=int, default=0)
p.add_argument("--core_norm", type=int, default=1)
p.add_argument("--injection_norm", type=int, default=1)
p.add_argument("--injection", default="add")
p.add_argument("--state_init", default="zeros")
p.add_argument("--nvars", type=int, default=0)
args = p.parse_args()
torch.manual_seed(args.seed)
names = (
    list(string.ascii_letters)
    if args.names == "letters"
    else ["".join(x) for x in itertools.product(string.ascii_lowercase, repeat=2)]
)
names = names[: args.nvars] if args.nvars else names
vocab = ["<pad>", "<bos>"] + list(string.digits) + ["=", ";", "?", ">"] + names
tid = {t: i for i, t in enumerate(vocab)}


def problem(rng, hops):
    lens = [int(rng.integers(hops[0], hops[1] + 1)) for _ in range(args.chains)]
    vs = rng.choice(len(names), size=sum(lens), replace=False)
    chains, i = [], 0
    for L in lens:
        chains.append([names[j] for j in vs[i : i + L]])
        i += L
    roots = rng.integers(0, 10, size=args.chains)
    stmts = [
        [(c[0], str(r))] + [(c[k], c[k - 1]) for k in range(1, len(c))] for c, r in zip(chains, roots, strict=True)
    ]
    if args.order == "interleaved":
        owners = rng.permutation(np.repeat(np.arange(args.chains), lens))
        cur = [0] * args.chains
        ordered = []
        for o in owners:
            ordered.append(stmts[o][cur[o]])
            cur[o] += 1
    else:
        flat = [s for c in stmts for s in c]
        ordered = [flat[i] for i in rng.permutation(len(flat))]
    values = {}
    for c, r in zip(chains, roots, strict=True):
        for v in c:
            values[v] = int(r)
    depth = {v: k + 1 for c in chains for k, v in enumerate(c)}
    return ordered, values, depth, chains


def stmt_tokens(lhs, rhs):
    if args.fmt == "lhs":
        return [lhs, "=", rhs, ";"]
    if args.fmt == "pair":
        return [rhs, lhs, ";"]
    return [rhs, ">", lhs, ";"]


def q_tokens(q):
    return ["?", q] if args.fmt == "rhs" or True else None


STEP = [0]


def encode_train(rng, n):
    seqs = []
    hi = (
        args.hops[1]
        if not args.ramp
        else min(args.hops[1], args.hops[0] + int((args.hops[1] - args.hops[0] + 1) * STEP[0] / args.ramp))
    )
    for _ in range(n):
        ordered, values, depth, chains = problem(rng, [args.hops[0], hi])
        st = ["<bos>"] + [t for s in ordered for t in stmt_tokens(*s)]
        qs = list(values)
        seqs.append((st, [(q, values[q]) for q in qs]))
    qlen = 3 if args.qstyle == "pre" else 4
    T = max(len(st) + qlen * len(qs) for st, qs in seqs)
    B = n
    ids = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, 1, T, T), dtype=torch.bool)
    labels = torch.full((B, T), -100)
    for b, (st, qs) in enumerate(seqs):
        S = len(st)
        ids[b, :S] = torch.tensor([tid[t] for t in st])
        pos[b, :S] = torch.arange(S)
        mask[b, 0, :S, :S] = torch.tril(torch.ones(S, S, dtype=torch.bool))
        cur = S
        for q, a in qs:
            seg = ([tid["?"], tid[q]] if args.qstyle == "pre" else [tid[q], tid[">"], tid["?"]]) + [tid[str(a)]]
            L = len(seg)
            ids[b, cur : cur + L] = torch.tensor(seg)
            pos[b, cur : cur + L] = torch.arange(S, S + L)
            mask[b, 0, cur : cur + L, :S] = True
            mask[b, 0, cur : cur + L, cur : cur + L] = torch.tril(torch.ones(L, L, dtype=torch.bool))
            labels[b, cur + L - 1] = seg[-1]
            cur += L
        for t in range(cur, T):
            mask[b, 0, t, t] = True
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)


def eval_set(hops, n=100):
    rng = np.random.default_rng(12345 + hops)
    rows = []
    for _ in range(n):
        ordered, values, depth, chains = problem(rng, [hops, hops])
        q = chains[0][-1]
        toks = (
            ["<bos>"]
            + [t for s in ordered for t in stmt_tokens(*s)]
            + (["?", q] if args.qstyle == "pre" else [q, ">", "?"])
        )
        rows.append(([tid[t] for t in toks], values[q]))
    T = max(len(r[0]) for r in rows)
    ids = torch.zeros((n, T), dtype=torch.long)
    am = torch.zeros((n, T), dtype=torch.long)
    for i, (t, _) in enumerate(rows):
        ids[i, T - len(t) :] = torch.tensor(t)
        am[i, T - len(t) :] = 1
    return ids, am, torch.tensor([r[1] for r in rows])


if args.implicit:
    cfg = ImplicitConfig(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_prelude_layers=args.prelude,
        num_core_layers=args.core,
        num_coda_layers=args.coda,
        num_loops=args.loops[1],
        gradient=args.grad,
        gradient_steps=args.gsteps,
        pad_token_id=0,
        core_norm=bool(args.core_norm),
        injection_norm=bool(args.injection_norm),
        injection=args.injection,
        state_init=args.state_init,
    )
    model = ImplicitForCausalLM(cfg)
else:
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_hidden_layers=args.layers,
        intermediate_size=ImplicitConfig(hidden_size=args.hidden).intermediate_size,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(lc)
print("params", sum(p.numel() for p in model.parameters()), flush=True)
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: min(1, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
)
digits = torch.tensor([tid[str(d)] for d in range(10)])
evals = {h: eval_set(h) for h in map(int, args.eval_hops.split(","))}
eval_loops = list(map(int, args.eval_loops.split(",")))


def evaluate():
    model.eval()
    res = {}
    with torch.no_grad():
        for h, (ids, am, ans) in evals.items():
            pos = (am.cumsum(-1) - 1).clamp_min(0)
            if args.implicit:
                out = model(
                    input_ids=ids,
                    attention_mask=am,
                    position_ids=pos,
                    num_loops=max(eval_loops),
                    return_trajectory=True,
                    trajectory_loops=eval_loops,
                    use_cache=False,
                )
                res[h] = [
                    round(float((lg[:, -1, digits].argmax(-1) == ans).float().mean()), 2) for lg in out.trajectory
                ]
            else:
                lg = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits
                res[h] = [round(float((lg[:, -1, digits].argmax(-1) == ans).float().mean()), 2)]
    model.train()
    return res


rng = np.random.default_rng(args.seed)
start = time.time()
for step in range(args.steps):
    STEP[0] = step
    batch = encode_train(rng, args.batch)
    kw = {}
    if args.implicit:
        kw["num_loops"] = random.Random(f"{args.seed}/{step}").randint(*args.loops)
    else:
        kw["use_cache"] = False
    out = model(**batch, **kw)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    if (step + 1) % args.eval_every == 0 or step == args.steps - 1 or time.time() - start > args.minutes * 60:
        print(
            step + 1,
            round(time.time() - start),
            "loss",
            round(float(out.loss.detach()), 3),
            "eval",
            evaluate(),
            flush=True,
        )
    if time.time() - start > args.minutes * 60:
        break
