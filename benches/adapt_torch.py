#!/usr/bin/env python3
"""Eager PyTorch anchor for `symerge adapt` (CPU, or GPU with --device cuda): the same SyMerge step on a BERT-family
encoder (MiniLM-L6), written the way a researcher would in PyTorch.

One step = one task's batch (its inputs in a seeded order, `--batch` at a time, each batch padded
to its longest sequence, at most `--max-len` tokens): the merged encoder
`theta_pre + sum_k lambda[t, k] * tau_k` for every encoder tensor t (per-tensor Lambda, clamped
to [0, 1] after each step), the task's own pooler + classifier (initialised from its expert),
the soft cross-entropy against the expert's probabilities (computed once up front, outside the
timing, as `symerge cache-labels` does), backward to Lambda and the head, one Adam step on each.
Tasks are visited in turn. Prints one JSON line: seconds per step over the timed steps.

    python3 benches/adapt_torch.py --base target/assets/minilm \
        --task NAME=EXPERT_DIR:INPUTS.jsonl ... --threads 2 --steps 16 [--device cuda]

Needs torch, safetensors and tokenizers (pip). Reads the Hugging Face files only.
"""
import argparse
import json
import math
import random
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer


def strip(name):
    for p in ("bert.", "roberta."):
        if name.startswith(p):
            return name[len(p):]
    return name


DEV = torch.device("cpu")


def load(dir_):
    return {strip(k): v.float().to(DEV) for k, v in load_file(f"{dir_}/model.safetensors").items()}


def encoder(w, cfg, ids, types, mask):
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = cfg["layer_norm_eps"]
    n, s = ids.shape
    pos = torch.arange(s, device=ids.device).unsqueeze(0).expand(n, s)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos]
    x = x + w["embeddings.token_type_embeddings.weight"][types]
    x = F.layer_norm(x, (h,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    add_mask = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    d = h // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        def lin(name, v):
            return F.linear(v, w[p + name + ".weight"], w[p + name + ".bias"])
        q = lin("attention.self.query", x).view(n, s, heads, d).transpose(1, 2)
        k = lin("attention.self.key", x).view(n, s, heads, d).transpose(1, 2)
        v = lin("attention.self.value", x).view(n, s, heads, d).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + add_mask, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(n, s, h)
        x = F.layer_norm(lin("attention.output.dense", ctx) + x, (h,), w[p + "attention.output.LayerNorm.weight"],
                         w[p + "attention.output.LayerNorm.bias"], eps)
        inter = F.gelu(lin("intermediate.dense", x))
        x = F.layer_norm(lin("output.dense", inter) + x, (h,), w[p + "output.LayerNorm.weight"],
                         w[p + "output.LayerNorm.bias"], eps)
    return x[:, 0]


def classify(head, cls):
    pooled = torch.tanh(F.linear(cls, head["pooler.dense.weight"], head["pooler.dense.bias"]))
    return F.linear(pooled, head["classifier.weight"], head["classifier.bias"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--task", action="append", required=True, help="NAME=EXPERT_DIR:INPUTS.jsonl")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    global DEV
    DEV = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = json.load(open(f"{a.base}/config.json"))
    base = load(a.base)
    shared = sorted(k for k in base if k.startswith(("embeddings.", "encoder.")) and base[k].is_floating_point()
                    and not k.endswith("position_ids"))
    tok = Tokenizer.from_file(f"{a.base}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(a.max_len)

    tasks, taus = [], {k: [] for k in shared}
    for spec in a.task:
        name, rest = spec.split("=", 1)
        expert_dir, inputs = rest.rsplit(":", 1)
        ew = load(expert_dir)
        for k in shared:
            taus[k].append(ew[k] - base[k])
        texts = [json.loads(l)["text"] for l in open(inputs) if l.strip()]
        enc = [e.ids for e in tok.encode_batch(texts)]
        head = {k: ew[k].clone().requires_grad_(True)
                for k in ("pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias")}
        tasks.append({"name": name, "enc": enc, "head": head, "expert": ew})
    taus = {k: torch.stack(v).flatten(1) for k, v in taus.items()}
    K = len(tasks)
    lam = torch.full((len(shared), K), 0.3, device=DEV, requires_grad=True)

    def batch(enc):
        s = max(len(e) for e in enc)
        ids = torch.tensor([e + [0] * (s - len(e)) for e in enc], device=DEV)
        mask = torch.tensor([[1] * len(e) + [0] * (s - len(e)) for e in enc], device=DEV)
        return ids, torch.zeros_like(ids), mask

    # The experts' soft labels, once (what `symerge cache-labels` stores).
    with torch.no_grad():
        for t in tasks:
            probs = []
            for i in range(0, len(t["enc"]), 64):
                ids, types, mask = batch(t["enc"][i:i + 64])
                probs.append(torch.softmax(classify(t["expert"], encoder(t["expert"], cfg, ids, types, mask)), -1))
            t["probs"] = torch.cat(probs)
            del t["expert"]

    opt = torch.optim.Adam([{"params": [lam], "lr": a.lr}] +
                           [{"params": list(t["head"].values()), "lr": a.lr} for t in tasks])
    rng = random.Random(0)
    for t in tasks:
        t["order"], t["at"] = list(range(len(t["enc"]))), 0
        rng.shuffle(t["order"])

    def step(ti):
        t = tasks[ti]
        rows = [t["order"][(t["at"] + j) % len(t["order"])] for j in range(a.batch)]
        t["at"] += a.batch
        ids, types, mask = batch([t["enc"][r] for r in rows])
        merged = {k: base[k] + (lam[i] @ taus[k]).view(base[k].shape) for i, k in enumerate(shared)}
        logits = classify(t["head"], encoder(merged, cfg, ids, types, mask))
        loss = -(t["probs"][rows] * torch.log_softmax(logits, -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        return loss.item()

    for i in range(a.warmup):
        step(i % K)
    sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(i % K)
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    print(json.dumps({"part": "minilm", "run": "pytorch", "seconds_per_step": dt, "torch": torch.__version__,
                      "threads": a.threads, "tasks": K, "device": a.device}))


if __name__ == "__main__":
    main()
