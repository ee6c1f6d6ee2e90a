#!/usr/bin/env python3
"""mergekit 0.1.5's merges of `model+lora` references (PEFT LoRA adapters applied before the
merge), for tests/mergekit_parity.rs.

Writes under tests/fixtures/mergekit_lora/:
  base/, expert-1/, expert-2/   copies of tests/fixtures/mergekit's tiny Llama and two experts
  expert-3/ expert-1 stored in bf16
  lora-1/   a PEFT LoRA adapter of the base (r 4, alpha 8, q/v/down projections), random A and B
  lora-2/   r 2, alpha 5 with use_rslora, alpha_pattern (a regular expression for layer 0's q_proj:
            7, v_proj: 3), an embedding adapter on
            embed_tokens and lm_head in modules_to_save (stored whole)
  cases.json, out/<case>.safetensors   as make_mergekit_fixtures.py writes them

    target/venv-mergekit/bin/python tests/reference/make_lora_fixtures.py
"""

import pathlib
import shutil
import sys
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_mergekit_fixtures import fill, models, write_fixtures  # noqa: E402

SRC = pathlib.Path("tests/fixtures/mergekit")
LORAS = {
    "lora-1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora-2": dict(r=2, lora_alpha=5, use_rslora=True, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 7, "v_proj": 3},
                   target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]),
}


def make_inputs(out):
    for name in ("base", "expert-1", "expert-2"):
        shutil.copytree(SRC / name, out / name)
    # expert-3: expert-1 stored in bf16 (PEFT keeps a LoRA in f32 over it and rounds once).
    shutil.copytree(SRC / "expert-1", out / "expert-3")
    t = load_file(str(out / "expert-3" / "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in t.items()}, str(out / "expert-3" / "model.safetensors"))
    for i, (name, spec) in enumerate(LORAS.items()):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(init_lora_weights=False, **spec))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn_like(p))
                elif "modules_to_save" in n:
                    p.add_(0.05 * torch.randn_like(p))
        peft.save_pretrained(str(out / name))
        (out / name / "README.md").unlink(missing_ok=True)


L1, L2 = "{lora-1}", "{lora-2}"
CASES = {
    # The adapted base alone: what PEFT's merge_and_unload gives.
    "lora_linear_alone": {"merge_method": "linear", "models": models(("{base}+" + L2, {"weight": 1.0}))},
    "lora_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "{base}",
                             "models": models(("{expert-1}+" + L1, {"weight": 0.6}), ("{expert-2}+" + L2, {"weight": 0.4}))},
    "lora_bf16_alone": {"merge_method": "linear", "dtype": "float32", "models": models(("{expert-3}+" + L1, {"weight": 1.0}))},
    "lora_ties_base": {"merge_method": "ties", "base_model": "{base}+" + L1,
                       "models": models(("{expert-1}", {"weight": 1.0, "density": 0.5}),
                                        ("{expert-2}+" + L2, {"weight": 0.7, "density": 0.6}))},
}


def run_case(name, case, out):
    paths = {n: str(out / n) for n in ("base", "expert-1", "expert-2", "expert-3", "lora-1", "lora-2")}
    cfg = dict({"dtype": "float32"}, **fill(case, paths))
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cache:
        run_merge(MergeConfiguration.model_validate(cfg), tmp,
                  MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0,
                               lora_merge_cache=cache))
        tensors = {}
        for f in sorted(pathlib.Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
    (out / "out").mkdir(exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sorted(tensors.items())}, str(out / "out" / f"{name}.safetensors"))


if __name__ == "__main__":
    write_fixtures("tests/fixtures/mergekit_lora", make_inputs, CASES, run_case)
