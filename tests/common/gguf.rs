//! A tiny Llama as a GGUF file (llama.cpp's format, version 3, f32 tensors), with every
//! metadata key and tensor open to damage: the import's tests build lying files from it.

use std::path::Path;

/// A metadata value of the types the importer reads.
#[derive(Clone)]
pub enum Meta {
    U32(u32),
    U64(u64),
    I32(i32),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    /// An array of `.1` elements of GGUF type `.0`, as their bytes.
    Raw(u32, u64, Vec<u8>),
}

/// A file's metadata and tensors (ggml dimension order: fastest first).
pub struct TinyGguf {
    pub meta: Vec<(String, Meta)>,
    pub tensors: Vec<(String, Vec<u64>)>,
    /// Tensors stored as Q8_0 rather than F32 (their element count must be whole blocks).
    pub q8_0: Vec<String>,
    /// Data offsets that replace the laid-out ones (relative to the data section).
    pub moved: Vec<(String, u64)>,
    /// Zero bytes appended after the data.
    pub tail: usize,
}

const ALIGN: usize = 32;

/// GPT-2's byte alphabet: the 256 one-character tokens a byte-level BPE starts from.
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars = printable.clone();
    let mut next = 256;
    for b in 0..256 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(next);
            next += 1;
        }
    }
    let mut by_byte = vec![String::new(); 256];
    for (b, c) in printable.iter().zip(&chars) {
        by_byte[*b as usize] = char::from_u32(*c).unwrap().to_string();
    }
    by_byte
}

impl TinyGguf {
    /// One layer, hidden 8, 2 heads (1 key/value head), FFN 16, a 300-token vocabulary, tied head.
    pub fn new() -> Self {
        let (hidden, heads, kv, inter, vocab) = (8u64, 2u64, 1u64, 16u64, 300usize);
        let mut tokens = byte_tokens();
        let mut merges = Vec::new();
        while tokens.len() < vocab {
            let (a, b) = (tokens[tokens.len() % 50].clone(), tokens[(tokens.len() * 7) % 60].clone());
            let joined = format!("{a}{b}");
            if tokens.contains(&joined) {
                tokens.push(format!("x{}", tokens.len()));
            } else {
                tokens.push(joined);
                merges.push(format!("{a} {b}"));
            }
        }
        let n = tokens.len();
        let meta = vec![
            ("general.architecture".into(), Meta::Str("llama".into())),
            ("llama.embedding_length".into(), Meta::U32(hidden as u32)),
            ("llama.attention.head_count".into(), Meta::U32(heads as u32)),
            ("llama.attention.head_count_kv".into(), Meta::U32(kv as u32)),
            ("llama.block_count".into(), Meta::U32(1)),
            ("llama.feed_forward_length".into(), Meta::U32(inter as u32)),
            ("llama.context_length".into(), Meta::U32(64)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Meta::F32(1e-5)),
            ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)),
            ("tokenizer.ggml.merges".into(), Meta::Strs(merges)),
            ("tokenizer.ggml.token_type".into(), Meta::I32s(vec![1; n])),
        ];
        let hd = hidden / heads;
        let mut tensors = vec![("token_embd.weight".to_string(), vec![hidden, vocab as u64])];
        for (part, dims) in [
            ("attn_norm", vec![hidden]),
            ("attn_q", vec![hidden, hidden]),
            ("attn_k", vec![hidden, kv * hd]),
            ("attn_v", vec![hidden, kv * hd]),
            ("attn_output", vec![hidden, hidden]),
            ("ffn_norm", vec![hidden]),
            ("ffn_gate", vec![hidden, inter]),
            ("ffn_up", vec![hidden, inter]),
            ("ffn_down", vec![inter, hidden]),
        ] {
            tensors.push((format!("blk.0.{part}.weight"), dims));
        }
        tensors.push(("output_norm.weight".into(), vec![hidden]));
        TinyGguf { meta, tensors, q8_0: Vec::new(), moved: Vec::new(), tail: 0 }
    }

    /// Replaces (or adds) one metadata entry.
    pub fn set(mut self, key: &str, value: Meta) -> Self {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.into(), value));
        self
    }

    /// The file's bytes: header, metadata, tensor infos, then the aligned f32 data.
    pub fn bytes(&self) -> Vec<u8> {
        let mut head = b"GGUF".to_vec();
        head.extend(3u32.to_le_bytes());
        head.extend((self.tensors.len() as u64).to_le_bytes());
        head.extend((self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            put_str(&mut head, k);
            put_meta(&mut head, v);
        }
        let mut data = Vec::new();
        for (i, (name, dims)) in self.tensors.iter().enumerate() {
            data.resize(data.len().next_multiple_of(ALIGN), 0);
            put_str(&mut head, name);
            head.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| head.extend(d.to_le_bytes()));
            let q8 = self.q8_0.contains(name);
            head.extend(if q8 { 8u32 } else { 0 }.to_le_bytes()); // Q8_0 or F32
            let moved = self.moved.iter().find(|(n, _)| n == name).map(|(_, o)| *o);
            head.extend(moved.unwrap_or(data.len() as u64).to_le_bytes());
            let numel: u64 = dims.iter().product();
            let values = super::randoms(i as u64, numel as usize, 0.1);
            if q8 {
                put_q8_0(&mut data, &values);
            } else {
                values.iter().for_each(|v| data.extend((*v as f32).to_le_bytes()));
            }
        }
        head.resize(head.len().next_multiple_of(ALIGN), 0);
        head.extend(data);
        head.resize(head.len() + self.tail, 0);
        head
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}

/// `values` as Q8_0 blocks (a 0.01 scale, the values over it rounded).
fn put_q8_0(out: &mut Vec<u8>, values: &[f64]) {
    for block in values.chunks(32) {
        out.extend(half::f16::from_f32(0.01).to_le_bytes());
        block.iter().for_each(|v| out.push((v / 0.01).round() as i8 as u8));
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, v: &Meta) {
    match v {
        Meta::U32(x) => {
            out.extend(4u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::U64(x) => {
            out.extend(10u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::I32(x) => {
            out.extend(5u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::F32(x) => {
            out.extend(6u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::F64(x) => {
            out.extend(12u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Meta::Bool(b) => {
            out.extend(7u32.to_le_bytes());
            out.push(u8::from(*b));
        }
        Meta::Str(s) => {
            out.extend(8u32.to_le_bytes());
            put_str(out, s);
        }
        Meta::Strs(items) => {
            out.extend(9u32.to_le_bytes());
            out.extend(8u32.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|s| put_str(out, s));
        }
        Meta::I32s(items) => {
            out.extend(9u32.to_le_bytes());
            out.extend(5u32.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Meta::Raw(ty, count, bytes) => {
            out.extend(9u32.to_le_bytes());
            out.extend(ty.to_le_bytes());
            out.extend(count.to_le_bytes());
            out.extend(bytes);
        }
    }
}
