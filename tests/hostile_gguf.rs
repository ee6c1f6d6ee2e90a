//! GGUF files built to hurt the importer, from fuzzing round 3: metadata arrays that cost far
//! more memory than their bytes, tensor layouts llama.cpp refuses (unaligned, overlapping,
//! rows cut through quantization blocks), metadata of the wrong type or out of f32's range, a
//! head width whose products with the head counts wrap, merges and token types that do not fit
//! the vocabulary. Each is refused naming the file and the key, tensor or list element, with no
//! output left; the memory case imports in memory about its size.

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
