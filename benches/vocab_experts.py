#!/usr/bin/env python3
"""Two bf16 experts of an imported SmolLM2 (in ./smol) whose tokenizers added chat tokens, for the
`tokenizer_source` check in benches/RESULTS.md. Run in a directory holding smol/ (symerge
import-gguf), with the mergekit venv's python (torch, safetensors, tokenizers)."""
import json, shutil, pathlib, torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
g = torch.Generator().manual_seed(7)
def expert(name, added, scale):
    out = pathlib.Path(name); out.mkdir(exist_ok=True)
    t = load_file("smol/model.safetensors")
    t = {k: (v + scale * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in t.items()}
    emb = t["model.embed_tokens.weight"]
    t["model.embed_tokens.weight"] = torch.cat([emb, (0.05 * torch.randn(len(added), emb.shape[1], generator=g)).to(torch.bfloat16)])
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    tok = Tokenizer.from_file("smol/tokenizer.json")
    n = tok.add_special_tokens(added)
    assert n == len(added), n
    tok.save(str(out / "tokenizer.json"))
    cfg = json.load(open("smol/config.json")); cfg["vocab_size"] = emb.shape[0] + len(added)
    json.dump(cfg, open(out / "config.json", "w"), indent=2)
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
expert("exp-a", ["<|tool_a|>", "<|tool_b|>"], 0.002)
expert("exp-b", ["<|tool_b|>"], 0.003)
pathlib.Path("smol/tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
