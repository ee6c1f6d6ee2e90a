#!/usr/bin/env python3
"""mergekit 0.1.5's merges of a tiny Llama checkpoint, for tests/mergekit_parity.rs.

Writes under tests/fixtures/mergekit/:
  base/, expert-1/, expert-2/, expert-3/   config.json + model.safetensors (float32): a seeded
      tiny Llama (hidden 16, 2 layers, GQA 2/1, vocab 32) and three fine-tunes of it, each the
      base plus a shared direction and a direction of its own (so task vectors have cosines
      near 0.5 and SLERP, Model Stock and TIES see non-trivial geometry)
  expert-4/, expert-5/, expert-6/   three further fine-tunes of one shared fine-tune of base:
      their task vectors are bit-identical on the first 32 elements of every tensor (all of a
      tensor under 128 elements) and independent elsewhere, so a variance over them is exactly 0
      there (SCE's selection counts such elements); made on first use, leaving the others as
      they are
  cases.json       per case: the merge config as YAML with {base} and {expert-N} placeholders
  out/<case>.safetensors   mergekit's output for that case

Methods whose masks are random (della at density < 1, dare) are left out: mergekit draws from
torch's generator, which symerge's Philox streams do not reproduce; della is compared at
density 1, where it is deterministic, and tested by its statistics in the Rust test.

The outputs of karcher (`torch.dot`, MKL's SDOT) and non-flattened nuslerp (`torch.acos`, MKL's
vector math) depend on the code path MKL picks for the CPU: regenerated on another machine, five
cases (karcher, karcher_tol0, slices_mixed_base_karcher, nuslerp_base_rows/columns) differ from
the committed ones by 1-2 ulp (at most 5e-6 relative by the test's measure, against its 2e-5),
while two runs on one machine agree bit for bit; thread counts and MKL_CBWR change nothing.
Compare regenerated fixtures within the test's tolerance, not byte for byte.
`provenance.json` records the torch, MKL and mergekit versions and the CPU of the last run.

    python3 -m venv --system-site-packages /work/venv-mk
    /work/venv-mk/bin/pip install mergekit==0.1.5
    /work/venv-mk/bin/python tests/reference/make_mergekit_fixtures.py [--out tests/fixtures/mergekit]
"""

import argparse
import json
import pathlib
import shutil
import tempfile

import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "vocab_size": 32,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}



def shapes():
    h, i, v, kv = 16, 32, 32, 8
    out = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for layer in range(2):
        p = f"model.layers.{layer}."
        out.update(
            {
                p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h],
                p + "self_attn.q_proj.weight": [h, h],
                p + "self_attn.k_proj.weight": [kv, h],
                p + "self_attn.v_proj.weight": [kv, h],
                p + "self_attn.o_proj.weight": [h, h],
                p + "mlp.gate_proj.weight": [i, h],
                p + "mlp.up_proj.weight": [i, h],
                p + "mlp.down_proj.weight": [h, i],
            }
        )
    return out


def write_model(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path / "model.safetensors"))


def make_inputs(out):
    g = torch.Generator().manual_seed(1234)
    base = {}
    for name, shape in shapes().items():
        if "norm" in name:
            base[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            base[name] = 0.5 * torch.randn(shape, generator=g)
    common = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    write_model(out / "base", base)
    for e in range(1, 4):
        scale = 0.02 * e
        expert = {k: v + scale * (common[k] + torch.randn(v.shape, generator=g)) for k, v in base.items()}
        write_model(out / f"expert-{e}", expert)


def make_shared_experts(out):
    g = torch.Generator().manual_seed(4321)
    base = load_file(str(out / "base" / "model.safetensors"))
    shared = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for e in range(4, 7):
        expert = {}
        for k, v in shared.items():
            own = 0.03 * torch.randn(v.shape, generator=g)
            flat = own.flatten()
            flat[: 32 if v.numel() >= 128 else v.numel()] = 0.0
            expert[k] = v + flat.reshape(v.shape)
        write_model(out / f"expert-{e}", expert)


def models(*entries):
    return [{"model": m, "parameters": p} if p else {"model": m} for m, p in entries]


E1, E2, E3 = "{expert-1}", "{expert-2}", "{expert-3}"

CASES = {
    "slerp": {"merge_method": "slerp", "base_model": "{base}", "models": models(("{base}", None), (E2, None)),
              "parameters": {"t": 0.3}},
    "slerp_filtered": {"merge_method": "slerp", "base_model": "{base}", "models": models(("{base}", None), (E3, None)),
                       "parameters": {"t": [{"filter": "self_attn", "value": 0.8}, {"filter": "mlp", "value": 0.25},
                                            {"value": 0.6}]}},
    "nearswap": {"merge_method": "nearswap", "base_model": "{base}", "models": models(("{base}", None), (E2, None)),
                 "parameters": {"t": 0.03}},
    "passthrough": {"merge_method": "passthrough", "models": models((E1, {"scale": 0.5}))},
    "model_stock": {"merge_method": "model_stock", "base_model": "{base}",
                    "models": models((E1, None), (E2, None), (E3, None))},
    "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": "{base}",
                                "models": models((E1, None), (E2, None), (E3, None)),
                                "parameters": {"filter_wise": True}},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "{base}",
                    "models": models((E1, {"weight": 1.0, "density": 0.5, "gamma": 0.1}),
                                     (E2, {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
                                     (E3, {"weight": 0.7, "density": 0.3, "gamma": 0.2}))},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "{base}",
                         "models": models((E1, {"weight": 1.0, "density": 0.4}), (E2, {"weight": 0.8, "density": 0.5}),
                                          (E3, {"weight": 0.6, "density": 0.7})),
                         "parameters": {"gamma": 0.1, "lambda": 0.9}},
    "breadcrumbs_rescale": {"merge_method": "breadcrumbs", "base_model": "{base}",
                            "models": models((E1, {"weight": 0.6}), (E2, {"weight": 0.4})),
                            "parameters": {"density": 0.5, "gamma": 0.1, "rescale": True, "normalize": True}},
    "della_density1": {"merge_method": "della", "base_model": "{base}",
                       "models": models((E1, {"weight": 1.0, "density": 1.0}), (E2, {"weight": 0.5, "density": 1.0}),
                                        (E3, {"weight": 0.3, "density": 1.0})),
                       "parameters": {"lambda": 1.1, "int8_mask": True}},
    "della_linear_density1": {"merge_method": "della_linear", "base_model": "{base}",
                              "models": models((E1, {"weight": 0.7}), (E2, {"weight": 0.3})),
                              "parameters": {"density": 1.0, "epsilon": 0.05}},
    "sce": {"merge_method": "sce", "base_model": "{base}", "models": models((E1, None), (E2, None), (E3, None)),
            "parameters": {"select_topk": 0.4}},
    # 480 of 512 elements vary: 480 * 0.7 is 336 in f32 (mergekit's k), 335.99999 in f64.
    "sce_shared": {"merge_method": "sce", "base_model": "{base}",
                   "models": models(("{expert-4}", None), ("{expert-5}", None), ("{expert-6}", None)),
                   "parameters": {"select_topk": 0.7}},
    "sce_all": {"merge_method": "sce", "base_model": "{base}", "models": models((E1, None), (E2, None)),
                "parameters": {"int8_mask": True}},
    "nuslerp": {"merge_method": "nuslerp", "models": models((E1, {"weight": 0.3}), (E2, {"weight": 0.7}))},
    "nuslerp_base_rows": {"merge_method": "nuslerp", "base_model": "{base}",
                          "models": models((E1, {"weight": 1.0}), (E3, {"weight": 0.5})),
                          "parameters": {"nuslerp_flatten": False}},
    "nuslerp_base_columns": {"merge_method": "nuslerp", "base_model": "{base}",
                             "models": models((E2, {"weight": 0.4}), (E3, {"weight": 0.6})),
                             "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "ties": {"merge_method": "ties", "base_model": "{base}",
             "models": models((E1, {"weight": 1.0, "density": 0.3}), (E2, {"weight": 0.6, "density": 0.5}),
                              (E3, {"weight": 0.4, "density": 0.05})),
             "parameters": {"int8_mask": True}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "{base}",
                        "models": models((E1, {"weight": 0.5}), (E2, {"weight": -0.25})),
                        "parameters": {"lambda": 0.8}},
    "linear": {"merge_method": "linear", "models": models((E1, {"weight": 0.2}), (E2, {"weight": 0.3}),
                                                          (E3, {"weight": 0.5}))},
    # A base_model that `models` does not list is merged as one more model, last, its weight from
    # the top-level parameters (mergekit's normalize_config).
    # Weights far below 1e-8 that do not sum to 0: mergekit's linear divides by their sum.
    "linear_tiny_weights": {"merge_method": "linear", "models": models((E1, {"weight": 2e-9}), (E2, {"weight": 3e-9})),
                            "parameters": {"normalize": True}},
    # Forms pydantic accepts for mergekit: a gradient of quoted numbers, `parameters: null`, and
    # an empty list (not set here: the top-level weight applies).
    "lax_parameter_forms": {"merge_method": "linear",
                            "models": [{"model": E1, "parameters": {"weight": ["0.1", "0.9"]}},
                                       {"model": E2, "parameters": None},
                                       {"model": E3, "parameters": {"weight": []}}],
                            "parameters": {"weight": 0.5}},
    # pydantic's lax forms of switches and numbers: 0 for false, a quoted "false", 1_0 for 10.
    "lax_switches": {"merge_method": "linear",
                     "models": [{"model": E1, "parameters": {"weight": "1_0"}}, {"model": E2, "parameters": {"weight": 5}}],
                     "parameters": {"normalize": 0}},
    "lax_switches_quoted": {"merge_method": "model_stock", "base_model": "{base}",
                            "models": models((E1, None), (E2, None), (E3, None)),
                            "parameters": {"filter_wise": "false"}},
    "linear_base_added": {"merge_method": "linear", "base_model": "{base}",
                          "models": models((E1, {"weight": 0.5}), (E2, {"weight": 0.2})),
                          "parameters": {"weight": 0.3}},
}


def src(model, a, b, params=None):
    out = {"model": model, "layer_range": [a, b]}
    if params:
        out["parameters"] = params
    return out


B = "{base}"

# The `slices` form (output config.json saved beside the tensors as out/<case>.config.json),
# a gradient in the `models` form, and the compute dtype.
CASES.update({
    "slices_passthrough": {"merge_method": "passthrough",
                           "slices": [{"sources": [src(E1, 0, 2)]}, {"sources": [src(E2, 1, 2)]},
                                      {"sources": [src(B, 0, 1)]}]},
    # pydantic reads layer indices written as floats, quoted, or booleans.
    "slices_passthrough_lax_ranges": {"merge_method": "passthrough",
                                      "slices": [{"sources": [src(E1, 0.0, "2")]}, {"sources": [src(E2, True, 2.0)]}]},
    "slices_slerp": {"merge_method": "slerp", "base_model": B,
                     "slices": [{"sources": [src(B, 0, 1), src(E1, 1, 2)], "parameters": {"t": 0.3}},
                                {"sources": [src(E2, 0, 2), src(B, 0, 2)]}],
                     "parameters": {"t": [0.2, 0.9]}},
    "slices_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": B,
                               "slices": [{"sources": [src(B, 0, 2), src(E1, 0, 2, {"weight": 0.7}),
                                                       src(E2, 0, 2, {"weight": 0.3})]},
                                          {"base_model": E3, "parameters": {"lambda": 0.5},
                                           "sources": [src(E1, 0, 1, {"weight": 0.5}), src(E3, 1, 2),
                                                       src(E2, 1, 2, {"weight": [1.0, 2.0]})]}]},
    "slerp_gradient": {"merge_method": "slerp", "base_model": B, "models": models((B, None), (E1, None)),
                       "parameters": {"t": [0.1, 0.9]}},
    "dtype_bfloat16": {"merge_method": "linear", "dtype": "bfloat16",
                       "models": models((E1, {"weight": 0.25}), (E2, {"weight": 0.75}))},
    # mergekit rounds each result to `dtype` before casting it to `out_dtype`.
    "dtype_bf16_out_f16": {"merge_method": "linear", "dtype": "bfloat16", "out_dtype": "float16",
                           "models": models((E1, {"weight": 0.25}), (E2, {"weight": 0.75}))},
    # Weights whose products are exact enough: mergekit's linear accumulates x * w with a fused
    # multiply-add in f32 (symerge multiplies, then adds), which lands results near a bf16
    # halfway point on the other side (0.6/0.4: 2 of 10k elements one bf16 ulp apart).
    "dtype_bf16_out_f32": {"merge_method": "linear", "dtype": "bfloat16", "out_dtype": "float32",
                           "models": models((E1, {"weight": 0.625}), (E3, {"weight": 0.375}))},
})

# Slices with different numbers of sources: each tensor merges its own slice's sources, the
# embeddings the first slice's, and the final norm and head the last slice's first sources as
# written, as many as the first slice has (mergekit's plan_module zips the two lists), with
# weights normalised over those.
CASES.update({
    "slices_unequal_linear": {"merge_method": "linear",
                              "slices": [{"sources": [src(E1, 0, 1, {"weight": 0.3}), src(E2, 0, 1, {"weight": 0.7})]},
                                         {"sources": [src(E3, 1, 2, {"weight": 1.0})]},
                                         {"sources": [src(E2, 1, 2, {"weight": 0.25}), src(E3, 0, 1, {"weight": 0.75}),
                                                      src(E1, 1, 2, {"weight": 0.5})]}]},
    "slices_unequal_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": B,
                                       "parameters": {"lambda": 0.9},
                                       "slices": [{"sources": [src(B, 0, 2), src(E1, 0, 2, {"weight": 0.5}),
                                                               src(E2, 0, 2, {"weight": 0.3}),
                                                               src(E3, 0, 2, {"weight": 0.2})]},
                                                  {"sources": [src(E3, 1, 2, {"weight": 0.8}), src(B, 1, 2)]}]},
    "slices_unequal_ties": {"merge_method": "ties", "base_model": B, "parameters": {"int8_mask": True},
                            "slices": [{"sources": [src(B, 0, 1), src(E1, 0, 1, {"weight": 1.0, "density": 0.5}),
                                                    src(E2, 0, 1, {"weight": 0.6, "density": 0.3})]},
                                       {"sources": [src(B, 1, 2), src(E3, 1, 2, {"weight": 0.7, "density": 0.4})]}]},
})

# Slices with a base and without (methods whose base is optional): each slice's layers merge
# with or without that slice's base, the embeddings with the first slice's, the final norm and
# head with the last slice's (over its first sources as written, as many as the first slice has).
CASES.update({
    "slices_mixed_base_multislerp": {"merge_method": "multislerp",
                                     "slices": [{"sources": [src(E1, 0, 1, {"weight": 0.3}),
                                                             src(E2, 0, 1, {"weight": 0.7})]},
                                                {"base_model": B,
                                                 "sources": [src(B, 1, 2), src(E3, 1, 2, {"weight": 0.6}),
                                                             src(E1, 1, 2, {"weight": 0.4})]}]},
    "slices_mixed_base_nuslerp": {"merge_method": "nuslerp",
                                  "slices": [{"base_model": B,
                                              "sources": [src(E2, 0, 2, {"weight": 0.4}), src(B, 0, 2),
                                                          src(E3, 0, 2, {"weight": 0.6})]},
                                             {"sources": [src(E1, 1, 2, {"weight": 0.3}),
                                                          src(E3, 1, 2, {"weight": 0.7})]}]},
    "slices_mixed_base_karcher": {"merge_method": "karcher", "parameters": {"max_iter": 4, "tol": 0.0},
                                  "slices": [{"sources": [src(E1, 0, 1), src(E2, 0, 1)]},
                                             {"base_model": B, "sources": [src(B, 1, 2), src(E3, 1, 2)]}]},
})

# Switches and counts given per slice hold for that slice's tensors (mergekit resolves them per
# tensor, from the slice's `parameters` before the top level's).
CASES.update({
    "slices_switches_ties": {"merge_method": "ties", "base_model": B, "parameters": {"normalize": True},
                             "slices": [{"sources": [src(B, 0, 1), src(E1, 0, 1, {"weight": 0.6, "density": 0.5}),
                                                     src(E2, 0, 1, {"weight": 0.9, "density": 0.7})],
                                         "parameters": {"normalize": False}},
                                        {"sources": [src(B, 1, 2), src(E3, 1, 2, {"weight": 0.7, "density": 0.4}),
                                                     src(E1, 1, 2, {"weight": 0.5, "density": 0.6})]}]},
    "slices_switches_karcher": {"merge_method": "karcher", "parameters": {"tol": 0.0},
                                "slices": [{"sources": [src(E1, 0, 1), src(E2, 0, 1)], "parameters": {"max_iter": 1}},
                                           {"sources": [src(E3, 1, 2), src(E1, 1, 2)]}]},
})

# Spherical means: multislerp over weights and over task vectors; karcher over nearly parallel
# weights (its default stops on `tol` after a step or two) and with `tol: 0`, which runs every
# one of `max_iter` steps, with a base_model (which mergekit averages as one more model).
CASES.update({
    "multislerp": {"merge_method": "multislerp",
                   "models": models((E1, {"weight": 0.2}), (E2, {"weight": 0.3}), (E3, {"weight": 0.5}))},
    "multislerp_base": {"merge_method": "multislerp", "base_model": B,
                        "models": models((E1, {"weight": 1.0}), (E2, {"weight": 0.5}), (E3, {"weight": 0.25})),
                        "parameters": {"normalize_weights": False}},
    "karcher": {"merge_method": "karcher", "models": models((E1, None), (E2, None), (E3, None))},
    "karcher_tol0": {"merge_method": "karcher", "base_model": B, "models": models((E1, None), (E3, None)),
                     "parameters": {"max_iter": 4, "tol": 0.0}},
})

# Parameter fall-through: a level (model, slice, top) whose filtered list matches no filter for a
# tensor gives no value, and the next level's is taken (mergekit's resolve_parameter).
CASES.update({
    "filter_fallthrough": {"merge_method": "task_arithmetic", "base_model": B,
                           "models": models((E1, {"weight": [{"filter": "mlp", "value": 0.2}]}), (E2, {"weight": 0.5})),
                           "parameters": {"weight": 0.7, "lambda": [{"filter": "self_attn", "value": 0.6}]}},
    "slices_filter_fallthrough": {"merge_method": "ties", "base_model": B, "parameters": {"weight": 0.4, "density": 0.6},
                                  "slices": [{"sources": [src(B, 0, 2),
                                                          src(E1, 0, 2, {"weight": [{"filter": "mlp", "value": 1.0}]}),
                                                          src(E3, 0, 2, {"density": [{"filter": "q_proj", "value": 0.2}]})],
                                              "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}]}}]},
    # `filter: "*"` matches every tensor; gradients inside filtered entries and over three points.
    "filter_wildcard_gradients": {"merge_method": "task_arithmetic", "base_model": B,
                                  "models": models((E1, {"weight": [{"filter": "mlp", "value": [0.1, 0.9]},
                                                                    {"filter": "*", "value": 0.3}]}),
                                                   (E2, {"weight": [0.5, 1.0, 0.2]})),
                                  "parameters": {"lambda": [{"filter": "layers.1", "value": [0.9, 0.4]}, {"value": 1.0}]}},
    # One `{filter, value}` object, not in a list (mergekit reads it as a list of one), with and
    # without a filter, and falling through when its filter misses.
    "filter_single_object": {"merge_method": "ties", "base_model": B,
                             "models": models((E1, {"weight": {"value": [0.3, 0.8]}, "density": 0.5}),
                                              (E2, {"weight": {"filter": "mlp", "value": 0.4},
                                                    "density": {"value": 0.7}})),
                             "parameters": {"weight": 0.6, "lambda": {"value": 0.9}}},
})

# The `modules:` form's one module (`default`): its parameters resolve after a slice's and before
# the top level's, a filtered list matching nothing passes on, and its switches (`normalize`)
# override the top level's.
CASES.update({
    "modules_models_fallthrough": {
        "merge_method": "task_arithmetic", "base_model": B, "parameters": {"weight": 0.7, "lambda": 0.5},
        "modules": {"default": {
            "models": models((E1, {"weight": [{"filter": "mlp", "value": 0.2}]}), (E2, None)),
            "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}], "lambda": 0.8}}}},
    "modules_slices_fallthrough": {
        "merge_method": "ties", "base_model": B, "parameters": {"weight": 0.4, "density": 0.6, "normalize": True},
        "modules": {"default": {
            "slices": [{"sources": [src(B, 0, 2), src(E1, 0, 2, {"weight": [{"filter": "q_proj", "value": 1.0}]}),
                                    src(E3, 0, 2)],
                        "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}]}}],
            "parameters": {"weight": [{"filter": "mlp", "value": 0.3}],
                           "density": [{"filter": "layers.1", "value": 0.8}], "normalize": False}}}},
})

# Found by probing (thirteenth session): per-model parameters' filters see each source's own
# tensor name (its layer index, not the output's); TIES's rescale restores the l1 norm;
# normalised weights summing to 0 divide by 1 in the task-vector methods.
CASES.update({
    "slices_input_name_filters": {
        "merge_method": "linear",
        "parameters": {"weight": [{"filter": "layers.1", "value": 3.0}, {"value": 1.0}]},
        "slices": [{"sources": [src(E1, 0, 1), src(E2, 1, 2)]}, {"sources": [src(E1, 1, 2), src(E2, 0, 1)]}]},
    "slices_input_name_ties": {
        "merge_method": "ties", "base_model": B,
        "parameters": {"density": [{"filter": "layers.0", "value": 0.3}, {"value": 0.8}], "lambda": 0.9, "weight": 0.6},
        "slices": [{"sources": [src(B, 0, 1), src(E1, 1, 2, {"weight": [{"filter": "layers.1.mlp", "value": 0.2},
                                                                      {"value": 0.9}]}), src(E3, 0, 1)]},
                   {"sources": [src(B, 1, 2), src(E1, 0, 1, {"weight": [{"filter": "layers.1.mlp", "value": 0.2},
                                                                      {"value": 0.9}]}), src(E3, 1, 2)]}]},
    "ties_rescale": {"merge_method": "ties", "base_model": B, "parameters": {"rescale": True},
                     "models": models((E1, {"weight": 1.0, "density": 0.3}), (E2, {"weight": 0.5, "density": 0.6}))},
    "normalize_zero_sum": {"merge_method": "task_arithmetic", "base_model": B, "parameters": {"normalize": True},
                           "models": models((E1, {"weight": 0.3}), (E2, {"weight": -0.3}))},
})

# Empty slices (`layer_range: [n, n]`): no layer, but the first slice's sources still merge the
# embeddings and the last slice's the final norm and head (mergekit's `plan_slice`).
CASES.update({
    "slices_empty_middle": {"merge_method": "passthrough",
                            "slices": [{"sources": [src(E1, 0, 1)]}, {"sources": [src(E2, 1, 1)]},
                                       {"sources": [src(E3, 1, 2)]}]},
    "slices_empty_ends": {"merge_method": "linear", "parameters": {"weight": [0.3, 1.0]},
                          "slices": [{"sources": [src(E3, 0, 0), src(B, 0, 0)]},
                                     {"sources": [src(E1, 0, 2), src(E2, 0, 2)]},
                                     {"sources": [src(E2, 2, 2), src(E3, 2, 2)]}]},
})

# Arcee Fusion: a model's changes kept where their importance is an upper outlier.
CASES.update({
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": B, "models": models((E3, None))},
})

# RAM: epsilon at the task vectors' scale, so entries have 0, 1 or several contributors.
CASES.update({
    "ram": {"merge_method": "ram", "base_model": B, "models": models((E1, None), (E2, None), (E3, None)),
            "parameters": {"epsilon": 0.04}},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": B, "models": models((E1, None), (E2, None), (E3, None)),
                   "parameters": {"epsilon": 0.04, "r": 0.5, "alpha": 0.8}},
})


def fill(obj, paths):
    if isinstance(obj, str):
        for k, v in paths.items():
            obj = obj.replace("{" + k + "}", v)
        return obj
    if isinstance(obj, list):
        return [fill(x, paths) for x in obj]
    if isinstance(obj, dict):
        return {k: fill(v, paths) for k, v in obj.items()}
    return obj


def run_case(name, case, out):
    if "{expert-4}" in json.dumps(case) and not (out / "expert-4").exists():
        make_shared_experts(out)
    paths = {n: str(out / n) for n in ["base"] + [f"expert-{e}" for e in range(1, 7)]}
    cfg = dict({"dtype": "float32"}, **fill(case, paths))
    with tempfile.TemporaryDirectory() as tmp:
        run_merge(
            MergeConfiguration.model_validate(cfg),
            tmp,
            MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0),
        )
        tensors = {}
        for f in sorted(pathlib.Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        (out / "out").mkdir(exist_ok=True)
        if "slices" in case:
            shutil.copy(pathlib.Path(tmp) / "config.json", out / "out" / f"{name}.config.json")
    # Outputs keep their dtype when the case sets one.
    keep = "dtype" in case
    save_file({k: (v if keep else v.float()).contiguous() for k, v in sorted(tensors.items())},
              str(out / "out" / f"{name}.safetensors"))


def write_fixtures(default_out, make_inputs, cases, run_case):
    """Writes the inputs, every case's mergekit output and cases.json under --out (emptied first).
    With --only NAME (repeatable), runs just those cases on the inputs already there and adds
    them to cases.json, leaving the other outputs as they are (regenerating all of them moves
    a few MKL-dependent cases by an ulp or two); provenance.json records which were added so."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--only", action="append", default=[], choices=sorted(cases))
    args = ap.parse_args()
    out = pathlib.Path(args.out).resolve()
    if args.only:
        yamls = json.loads((out / "cases.json").read_text())
        prov_path = out / "provenance.json"
        prov = json.loads(prov_path.read_text()) if prov_path.exists() else {}
        for name in args.only:
            run_case(name, cases[name], out)
            yamls[name] = yaml.safe_dump(cases[name], sort_keys=False)
            prov.setdefault("added_later", {})[name] = provenance()
        (out / "cases.json").write_text(json.dumps(yamls, indent=1) + "\n")
        (out / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
        return
    if out.exists():
        shutil.rmtree(out)
    make_inputs(out)
    yamls = {}
    for name, case in cases.items():
        run_case(name, case, out)
        yamls[name] = yaml.safe_dump(case, sort_keys=False)
    (out / "cases.json").write_text(json.dumps(yamls, indent=1) + "\n")
    (out / "provenance.json").write_text(json.dumps(provenance(), indent=1) + "\n")


def provenance():
    """What produced the fixtures: outputs of some methods depend on the CPU's MKL path."""
    import platform
    from importlib.metadata import version

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    mkl = next((ln.strip(" -") for ln in torch.__config__.show().splitlines() if "Math Kernel Library" in ln), None)
    return {"mergekit": version("mergekit"), "torch": torch.__version__, "mkl": mkl, "cpu": cpu,
            "machine": platform.machine()}


if __name__ == "__main__":
    write_fixtures("tests/fixtures/mergekit", make_inputs, CASES, run_case)
