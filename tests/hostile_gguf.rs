//! GGUF files built to hurt the importer, from fuzzing round 3: metadata arrays that cost far
//! more memory than their bytes, tensor layouts llama.cpp refuses (unaligned, overlapping,
//! rows cut through quantization blocks), metadata of the wrong type or out of f32's range, a
//! head width whose products with the head counts wrap, merges and token types that do not fit
//! the vocabulary. Each is refused naming the file and the key, tensor or list element, with no
//! output left; the memory case imports in memory about its size. Also what a good file's
//! special tokens and chat template become beside the weights (tokenizer_config.json,
//! generation_config.json).

mod common;

use std::path::Path;

use common::gguf::{Meta, TinyGguf};
use common::run;

/// Imports `bytes` written as `<name>.gguf` and returns stderr, asserting that the import
/// failed without a panic, left no output, and named the file and every one of `want`.
fn refused(dir: &Path, name: &str, bytes: &[u8], want: &[&str]) -> String {
    let file = dir.join(format!("{name}.gguf"));
    std::fs::write(&file, bytes).unwrap();
    let out = dir.join(format!("{name}-out"));
    let (ok, _, err) = run(&["import-gguf", file.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!ok, "{name}: imported");
    assert!(!err.contains("panicked") && err.contains(file.to_str().unwrap()), "{name}: {err}");
    for w in want {
        assert!(err.contains(w), "{name}: expected `{w}` in: {err}");
    }
    assert!(!out.exists(), "{name}: left an output");
    err
}

/// A metadata array nobody reads (24 M u8, or 3 M two-letter strings) used to be decoded into
/// 32-byte values: 60 MB of file took 1.9 GB. It is now kept at its own width, so the import's
/// peak resident set stays within twice the file (its pages, mapped, and the array's copy) plus
/// the few tens of MB the tiny model's import needs.
#[test]
fn a_junk_metadata_array_costs_about_its_own_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 3_000_000u64;
    let strings: Vec<u8> = (0..n).flat_map(|_| [&2u64.to_le_bytes()[..], b"ab"].concat()).collect();
    let arrays = [("u8", Meta::Raw(0, 24_000_000, vec![1; 24_000_000])), ("strings", Meta::Raw(8, n, strings))];
    for (what, junk) in arrays {
        let file = tmp.path().join(format!("{what}.gguf"));
        TinyGguf::new().set("junk.array", junk).write(&file);
        let size = std::fs::metadata(&file).unwrap().len();
        let out = tmp.path().join(format!("{what}-out"));
        let (ok, stdout, err) = run(&["import-gguf", file.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]);
        assert!(ok, "{what}: {err}");
        let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let peak = summary["peak_rss_bytes"].as_u64().expect("VmHWM is available on Linux");
        eprintln!("{what}: file {:.1} MB, peak RSS {:.1} MB", size as f64 / 1e6, peak as f64 / 1e6);
        assert!(peak < 2 * size + 64_000_000, "{what}: a {size}-byte file took {peak} bytes");
    }
}

/// llama.cpp's reader refuses these layouts; so does the import, naming the tensor. Overlapping
/// tensors made a 676 KB file import to 257 MB; an unaligned offset or a Q8_0 row of 8 values
/// (a quarter of a block) were read as whatever bytes lay there.
#[test]
fn tensor_layouts_llama_cpp_refuses_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = TinyGguf::new();
    // The last tensor moved 4 bytes on, with room after it: misaligned, but inside the file.
    let last = good.tensors.last().unwrap().0.clone();
    let laid_out = |g: &TinyGguf, name: &str| {
        let (mut at, mut found) = (0u64, 0u64);
        for (n, dims) in &g.tensors {
            at = at.next_multiple_of(32);
            if n == name {
                found = at;
            }
            at += 4 * dims.iter().product::<u64>();
        }
        found
    };
    let mut unaligned = TinyGguf::new();
    unaligned.moved.push((last.clone(), laid_out(&good, &last) + 4));
    unaligned.tail = 32;
    let mut overlap = TinyGguf::new();
    overlap.moved.push(("blk.0.attn_k.weight".into(), laid_out(&good, "blk.0.attn_q.weight")));
    let mut past_end = TinyGguf::new();
    past_end.moved.push((last.clone(), laid_out(&good, &last) + 32));
    let mut rows = TinyGguf::new();
    rows.q8_0.push("blk.0.attn_q.weight".into());
    let cases: [(&str, TinyGguf, &[&str]); 4] = [
        ("unaligned", unaligned, &["tensor `output_norm.weight`", "is not a multiple of the alignment 32"]),
        ("overlap", overlap, &["`blk.0.attn_q.weight`", "overlaps that of `blk.0.attn_k.weight`"]),
        ("past-end", past_end, &["tensor `output_norm.weight`", "run past the end of the"]),
        ("rows", rows, &["`blk.0.attn_q.weight`: rows of 8 elements are not whole 32-element blocks of Q8_0"]),
    ];
    for (name, g, want) in cases {
        refused(tmp.path(), name, &g.bytes(), want);
    }
}

/// A size of the wrong type used to be "missing"; a key holding numbers where strings belong
/// too. Each now says what the value is and what the key needs.
#[test]
fn wrong_typed_metadata_says_what_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "llama.embedding_length",
            Meta::Str("8".into()),
            "`llama.embedding_length` is a string, expected an unsigned integer",
        ),
        ("llama.block_count", Meta::I32(-1), "`llama.block_count` is negative (-1), expected an unsigned integer"),
        ("llama.feed_forward_length", Meta::F32(16.0), "`llama.feed_forward_length` is a float (16)"),
        ("llama.attention.head_count_kv", Meta::Str("1".into()), "`llama.attention.head_count_kv` is a string"),
        ("llama.rope.freq_base", Meta::Str("1e4".into()), "`llama.rope.freq_base` is a string, expected a number"),
        ("tokenizer.ggml.tokens", Meta::I32s(vec![1; 300]), "is an array of 300 i32, expected an array of strings"),
        ("general.architecture", Meta::U32(1), "`general.architecture` is the integer 1, expected a string"),
    ];
    for (i, (key, value, want)) in cases.into_iter().enumerate() {
        let err = refused(tmp.path(), &format!("type-{i}"), &TinyGguf::new().set(key, value).bytes(), &[want]);
        assert!(!err.contains("missing"), "{key}: {err}");
    }
}

/// Values that pass as positive f64 but are inf, 0 or subnormal in f32 (symerge's precision) failed only
/// in a later command's rotary op, naming neither file nor key. A rotary width of 2^63 + 4
/// made a head width whose products with the head counts wrapped to the real tensors' widths,
/// so the import wrote a model every later command panicked on.
#[test]
fn sizes_and_scales_that_cannot_run_are_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let huge = (1u64 << 63) + 4;
    let cases = [
        (
            "llama.rope.freq_base",
            Meta::F64(1e300),
            "`llama.rope.freq_base` is 1e300, not a positive number within f32's range",
        ),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F64(1e-60), "rms_epsilon` is 1e-60, not a positive number"),
        // Subnormal in f32: config.json's reader refuses it, so the import must too, or it
        // writes a model no later command loads.
        ("llama.attention.layer_norm_rms_epsilon", Meta::F64(1e-40), "rms_epsilon` is 1e-40, not a positive number"),
        (
            "llama.rope.dimension_count",
            Meta::U64(huge),
            "`llama.rope.dimension_count` is 9223372036854775812, but the heads are 4 wide",
        ),
        ("llama.rope.dimension_count", Meta::U32(2), "`llama.rope.dimension_count` is 2, but the heads are 4 wide"),
        ("llama.attention.key_length", Meta::U64(huge), "`llama.attention.key_length` is 9223372036854775812"),
        // Fuzzing round 6: written as max_position_embeddings 0, transformers reads no token.
        ("llama.context_length", Meta::U32(0), "`llama.context_length` is 0: a model that reads no token"),
    ];
    for (i, (key, value, want)) in cases.into_iter().enumerate() {
        refused(tmp.path(), &format!("value-{i}"), &TinyGguf::new().set(key, value).bytes(), &[want]);
    }
    // The values a real file states still import.
    let file = tmp.path().join("fine.gguf");
    let fine = TinyGguf::new()
        .set("llama.rope.dimension_count", Meta::U32(4))
        .set("llama.attention.key_length", Meta::U32(4))
        .set("llama.rope.freq_base", Meta::F64(1e6));
    fine.write(&file);
    let (ok, _, err) = run(&["import-gguf", file.to_str().unwrap(), "-o", tmp.path().join("fine").to_str().unwrap()]);
    assert!(ok, "{err}");
}

/// A merge the tokenizer cannot apply was reported by the tokenizer library as a line of the
/// staged tokenizer.json, a file gone by the time the user reads it. It is now named by its
/// index in `tokenizer.ggml.merges` and its text.
#[test]
fn a_merge_outside_the_vocabulary_is_named_by_its_index() {
    let tmp = tempfile::tempdir().unwrap();
    let g = TinyGguf::new();
    let list = |key: &str| match &g.meta.iter().find(|(k, _)| k == key).unwrap().1 {
        Meta::Strs(t) => t.clone(),
        _ => unreachable!(),
    };
    let (tokens, merges) = (list("tokenizer.ggml.tokens"), list("tokenizer.ggml.merges"));
    // Two tokens whose concatenation is not one.
    let (a, b) = tokens
        .iter()
        .flat_map(|a| tokens.iter().map(move |b| (a, b)))
        .find(|(a, b)| !tokens.contains(&format!("{a}{b}")))
        .unwrap();
    for (i, (bad, want)) in
        [("a b c".to_string(), "`b c`".to_string()), (format!("{a} {b}"), format!("`{a}{b}`"))].into_iter().enumerate()
    {
        let mut m = merges.clone();
        m[3] = bad.clone();
        let bytes = TinyGguf::new().set("tokenizer.ggml.merges", Meta::Strs(m)).bytes();
        let err = refused(
            tmp.path(),
            &format!("merge-{i}"),
            &bytes,
            &[&format!("`tokenizer.ggml.merges[3]` (`{bad}`)"), &want],
        );
        assert!(!err.contains(".partial") && !err.contains("line"), "{err}");
    }
}

/// Token types of the wrong length, type or value, and empty tokens, used to pass unnoticed
/// (the special tokens silently dropped or misplaced).
#[test]
fn token_types_and_empty_tokens_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nine = vec![1; 300];
    nine[5] = 9;
    let mut empty = match &TinyGguf::new().meta.iter().find(|(k, _)| k == "tokenizer.ggml.tokens").unwrap().1 {
        Meta::Strs(t) => t.clone(),
        _ => unreachable!(),
    };
    empty[299] = String::new();
    let key = "tokenizer.ggml.token_type";
    let cases = [
        (key, Meta::I32s(vec![1; 299]), "`tokenizer.ggml.token_type` lists 299 types for 300 tokens"),
        (key, Meta::Strs(vec!["1".into(); 300]), "`tokenizer.ggml.token_type[0]` is a string, not a token type"),
        (key, Meta::U32(1), "`tokenizer.ggml.token_type` is the integer 1, expected an array"),
        (key, Meta::I32s(nine), "`tokenizer.ggml.token_type[5]` is the integer 9, not a token type"),
        ("tokenizer.ggml.tokens", Meta::Strs(empty), "`tokenizer.ggml.tokens[299]` is empty"),
    ];
    for (i, (key, value, want)) in cases.into_iter().enumerate() {
        refused(tmp.path(), &format!("tokens-{i}"), &TinyGguf::new().set(key, value).bytes(), &[want]);
    }
}

/// `inspect` (or any checkpoint reader) given a GGUF file said its safetensors header length
/// was implausibly large; it now says what the file is and how to convert it.
#[test]
fn inspect_of_a_gguf_file_points_to_import_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.gguf");
    TinyGguf::new().write(&file);
    let (ok, _, err) = run(&["inspect", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("is a GGUF file") && err.contains("symerge import-gguf"), "{err}");
}

/// The tiny file's token list.
fn tiny_tokens() -> Vec<String> {
    match &TinyGguf::new().meta.iter().find(|(k, _)| k == "tokenizer.ggml.tokens").unwrap().1 {
        Meta::Strs(t) => t.clone(),
        _ => unreachable!(),
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An import wrote config.json, model.safetensors and tokenizer.json only: transformers then saw
/// no BOS, EOS or PAD and no chat template. It now writes tokenizer_config.json (the special
/// tokens by name as the file lists them, add_bos/add_eos, the chat template, the context length)
/// and generation_config.json (with the end-of-turn token among the EOS ids, as llama.cpp stops
/// there), and a file that adds BOS gets it from tokenizer.json, which transformers 5 and
/// symerge's own tokenizer read.
#[test]
fn special_tokens_and_chat_template_reach_the_side_files() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tiny_tokens();
    let mut types = vec![1; tokens.len()];
    types[296..299].fill(3);
    let template = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
    let g = TinyGguf::new()
        .set("tokenizer.ggml.token_type", Meta::I32s(types))
        .set("tokenizer.ggml.bos_token_id", Meta::U32(296))
        .set("tokenizer.ggml.eos_token_id", Meta::U32(297))
        .set("tokenizer.ggml.eot_token_id", Meta::U32(298))
        .set("tokenizer.ggml.padding_token_id", Meta::U32(297))
        .set("tokenizer.ggml.unknown_token_id", Meta::U32(0))
        .set("tokenizer.ggml.add_bos_token", Meta::Bool(true))
        .set("tokenizer.ggml.add_eos_token", Meta::Bool(false))
        .set("tokenizer.chat_template", Meta::Str(template.into()));
    let (file, out) = (tmp.path().join("m.gguf"), tmp.path().join("m"));
    g.write(&file);
    let (ok, _, err) = run(&["import-gguf", file.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");

    let tc = read_json(&out.join("tokenizer_config.json"));
    let want = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[296], "eos_token": tokens[297], "pad_token": tokens[297], "unk_token": tokens[0],
        "add_bos_token": true, "add_eos_token": false, "chat_template": template, "model_max_length": 64,
    });
    assert_eq!(tc, want);
    let generation = read_json(&out.join("generation_config.json"));
    assert_eq!(generation, serde_json::json!({"bos_token_id": 296, "eos_token_id": [297, 298], "pad_token_id": 297}));
    let config = read_json(&out.join("config.json"));
    assert_eq!((&config["bos_token_id"], &config["eos_token_id"]), (&296.into(), &297.into()));

    let tok = symerge::model::TextTokenizer::from_dir(&out, 16).unwrap();
    let ids = &tok.tokenize(&["ab"]).unwrap()[0].ids;
    assert_eq!(ids.first(), Some(&296), "BOS added: {ids:?}");
    assert_ne!(ids.last(), Some(&297), "no EOS added: {ids:?}");

    // A merge of the import carries both files.
    let twin = tmp.path().join("twin");
    std::fs::create_dir(&twin).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(out.join(f), twin.join(f)).unwrap();
    }
    let cfg = tmp.path().join("m.yml");
    let yml = format!(
        "merge_method: linear\nparameters: {{weight: 1.0}}\nmodels:\n  - model: {}\n  - model: {}\n",
        out.display(),
        twin.display()
    );
    std::fs::write(&cfg, yml).unwrap();
    let merged = tmp.path().join("merged");
    let (ok, _, err) = run(&["merge", cfg.to_str().unwrap(), "-o", merged.to_str().unwrap(), "-q"]);
    assert!(ok, "{err}");
    for f in ["tokenizer_config.json", "generation_config.json"] {
        assert_eq!(std::fs::read(merged.join(f)).ok(), std::fs::read(out.join(f)).ok(), "{f}");
    }
}

/// A special token id past the token list is left out with a warning naming the key, as
/// llama.cpp leaves it out, instead of naming a token transformers cannot index; a flag of the
/// wrong type is refused naming its key.
#[test]
fn special_token_ids_outside_the_vocabulary_are_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, out) = (tmp.path().join("m.gguf"), tmp.path().join("m"));
    TinyGguf::new()
        .set("tokenizer.ggml.bos_token_id", Meta::U32(1))
        .set("tokenizer.ggml.padding_token_id", Meta::U32(5000))
        .write(&file);
    let (ok, _, err) = run(&["import-gguf", file.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("`tokenizer.ggml.padding_token_id` is 5000, past the 300 tokens"), "{err}");
    let tc = read_json(&out.join("tokenizer_config.json"));
    assert!(tc.get("pad_token").is_none() && tc["bos_token"] == tiny_tokens()[1], "{tc}");
    assert_eq!(read_json(&out.join("config.json"))["pad_token_id"], serde_json::Value::Null);

    let flag = TinyGguf::new().set("tokenizer.ggml.add_bos_token", Meta::U32(1)).bytes();
    refused(tmp.path(), "flag", &flag, &["`tokenizer.ggml.add_bos_token` is the integer 1, expected a bool"]);
}
