#!/usr/bin/env python3
"""What transformers reads as the real SmolLM2-135M-Instruct GGUF's special tokens, chat template
and generation ids, for tests/real_smollm2.rs to check `symerge import-gguf`'s tokenizer_config.json
and generation_config.json against.

Writes tests/fixtures/smollm2_special_tokens.json with, from `AutoTokenizer.from_pretrained(dir,
gguf_file=...)`: the bos/eos/unk/pad tokens and their ids, the chat template, and one
conversation rendered by it; and from the config transformers builds from the file: the
bos/eos/pad ids a GenerationConfig gets.

    target/venv-mergekit/bin/python tests/reference/make_smollm2_special_tokens.py GGUF_FILE [--out tests/fixtures]

With --check DIR instead, prints the same fields as AutoTokenizer / GenerationConfig read them from
an imported checkpoint directory (no gguf package needed): real_smollm2.rs compares the two.

Needs transformers, and gguf (pip) to read the GGUF file.
"""

import argparse
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoConfig, AutoTokenizer, GenerationConfig  # noqa: E402

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def tokenizer_fields(tok):
    out = {}
    for name in ["bos", "eos", "unk", "pad"]:
        out[f"{name}_token"] = getattr(tok, f"{name}_token")
        out[f"{name}_token_id"] = getattr(tok, f"{name}_token_id")
    out["chat_template"] = tok.chat_template
    out["rendered_chat"] = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    out["hello_ids"] = tok("Hello world").input_ids
    return out


def generation_fields(gen):
    return {k: getattr(gen, k) for k in ["bos_token_id", "eos_token_id", "pad_token_id"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf", nargs="?")
    p.add_argument("--out", default="tests/fixtures")
    p.add_argument("--check", help="an imported checkpoint directory to read instead")
    args = p.parse_args()
    if args.check:
        tok = AutoTokenizer.from_pretrained(args.check)
        gen = GenerationConfig.from_pretrained(args.check)
        print(json.dumps({**tokenizer_fields(tok), "generation": generation_fields(gen)}))
        return
    path = pathlib.Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    gen = GenerationConfig.from_model_config(config)
    out = pathlib.Path(args.out) / "smollm2_special_tokens.json"
    out.write_text(json.dumps({**tokenizer_fields(tok), "generation": generation_fields(gen)}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
