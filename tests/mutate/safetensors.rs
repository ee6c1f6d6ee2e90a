//! Safetensors files: a random valid one, then header lies (edited as JSON, the length field
//! recomputed), textual lies the JSON model cannot express (duplicate keys, invalid UTF-8, deep
//! nesting), and byte damage (truncation, flips, a lying length field).

use serde_json::{Map, Value, json};

use super::{Rng, damage_bytes, lying_number, wrong_json_number};

/// Every dtype name the format knows that these files use, with its element size.
pub const DTYPES: &[(&str, usize)] = &[
    ("F32", 4),
    ("F16", 2),
    ("BF16", 2),
    ("F64", 8),
    ("I64", 8),
    ("I32", 4),
    ("I16", 2),
    ("U16", 2),
    ("I8", 1),
    ("U8", 1),
    ("BOOL", 1),
];

const NAMES: &[&str] = &[
    "embeddings.word_embeddings.weight",
    "encoder.layer.#.attention.self.query.weight",
    "model.layers.#.mlp.gate_proj.weight",
    "h.#.attn.bias",
    "model.norm.weight",
    "lm_head.weight",
    "classifier.bias",
    "ümlaut ✓ name",
];

/// One tensor of a valid file.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// A valid file's tensors, in data order.
#[derive(Clone)]
pub struct Model {
    pub tensors: Vec<Tensor>,
    pub metadata: bool,
}

/// Up to five tensors named under `prefix` (unique names), with finite float values.
pub fn random_model(rng: &mut Rng, prefix: &str) -> Model {
    let n = rng.below(6);
    let tensors = (0..n)
        .map(|i| {
            let name = rng.pick(NAMES).replace('#', &rng.below(40).to_string());
            random_tensor(rng, format!("{prefix}{name}.{i}"))
        })
        .collect();
    Model { tensors, metadata: rng.chance(1, 2) }
}

fn random_tensor(rng: &mut Rng, name: String) -> Tensor {
    let &(dtype, size) = rng.pick(DTYPES);
    let shape: Vec<usize> = (0..rng.below(4)).map(|_| if rng.chance(1, 10) { 0 } else { 1 + rng.below(5) }).collect();
    let numel: usize = shape.iter().product();
    let data = match dtype {
        "F32" => (0..numel).flat_map(|_| rng.small_float().to_le_bytes()).collect(),
        "F16" => (0..numel).flat_map(|_| half::f16::from_f32(rng.small_float()).to_le_bytes()).collect(),
        "BF16" => (0..numel).flat_map(|_| half::bf16::from_f32(rng.small_float()).to_le_bytes()).collect(),
        "F64" => (0..numel).flat_map(|_| (rng.small_float() as f64).to_le_bytes()).collect(),
        _ => rng.bytes(numel * size),
    };
    Tensor { name, dtype, shape, data }
}

impl Model {
    /// The header as the format lays it out: contiguous offsets in tensor order.
    pub fn header(&self) -> Value {
        let mut head = Map::new();
        let mut at = 0;
        for t in &self.tensors {
            let end = at + t.data.len();
            head.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [at, end]}));
            at = end;
        }
        if self.metadata {
            head.insert("__metadata__".into(), json!({"format": "pt"}));
        }
        Value::Object(head)
    }

    pub fn data(&self) -> Vec<u8> {
        self.tensors.iter().flat_map(|t| t.data.iter().copied()).collect()
    }

    /// The valid file.
    pub fn bytes(&self) -> Vec<u8> {
        let text = serde_json::to_vec(&self.header()).expect("JSON");
        assemble(&pad(text, b' '), &self.data())
    }

    fn describe(&self) -> String {
        let t: Vec<String> = self.tensors.iter().map(|t| format!("{} {}{:?}", t.name, t.dtype, t.shape)).collect();
        format!("valid file of [{}]", t.join(", "))
    }
}

/// Pads header text to a multiple of 8 bytes, as the reference writer does (with spaces).
fn pad(mut text: Vec<u8>, with: u8) -> Vec<u8> {
    while !text.len().is_multiple_of(8) {
        text.push(with);
    }
    text
}

/// Length field, header, data.
pub fn assemble(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// A mutated file and the valid file it was made from.
pub struct Case {
    pub bytes: Vec<u8>,
    pub valid: Model,
    /// What was done, in order (printed with the seed when the case fails).
    pub notes: Vec<String>,
}

/// The case for `seed`: one in ten unmutated, the rest with one to three mutations applied
/// stage by stage (JSON edits, then text edits, then byte damage).
pub fn case(seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let valid = random_model(&mut rng, "");
    let mut notes = vec![valid.describe()];
    let stages: Vec<usize> =
        if rng.chance(1, 10) { Vec::new() } else { (0..1 + rng.below(3)).map(|_| rng.below(10)).collect() };
    let count = |lo: usize, hi: usize| stages.iter().filter(|&&s| (lo..hi).contains(&s)).count();
    let mut head = valid.header();
    let mut data = valid.data();
    for _ in 0..count(0, 2) {
        notes.push(consistent_edit(&mut rng, &mut head, &data));
    }
    for _ in 0..count(2, 6) {
        notes.push(header_lie(&mut rng, &mut head, &mut data));
    }
    let mut text = serde_json::to_vec(&head).expect("JSON");
    for _ in 0..count(6, 8) {
        notes.push(text_lie(&mut rng, &mut text));
    }
    let filler = if rng.chance(1, 20) { 0 } else { b' ' };
    let mut bytes = assemble(&pad(text, filler), &data);
    for _ in 0..count(8, 10) {
        notes.push(byte_lie(&mut rng, &mut bytes));
    }
    if stages.is_empty() {
        notes.push("unmutated".into());
    }
    Case { bytes, valid, notes }
}

/// The names of the header's tensors (not `__metadata__`).
fn tensor_names(head: &Value) -> Vec<String> {
    head.as_object().map_or(Vec::new(), |m| m.keys().filter(|k| *k != "__metadata__").cloned().collect())
}

/// An edit after which the file is still valid: the same bytes viewed as another dtype and
/// shape, a renamed tensor, an empty tensor added, string metadata.
fn consistent_edit(rng: &mut Rng, head: &mut Value, data: &[u8]) -> String {
    let names = tensor_names(head);
    match rng.below(4) {
        0 if !names.is_empty() => {
            let name = rng.pick(&names).clone();
            let entry = &mut head[&name];
            let span = span_of(entry);
            let fits: Vec<&(&str, usize)> = DTYPES.iter().filter(|(_, s)| span.is_multiple_of(*s)).collect();
            let &&(dtype, size) = rng.pick(&fits);
            let n = span / size;
            let shape = if n == 0 {
                json!([rng.below(3), 0])
            } else if n.is_multiple_of(2) {
                json!([2, n / 2])
            } else {
                json!([n])
            };
            entry["dtype"] = dtype.into();
            entry["shape"] = shape.clone();
            format!("`{name}` viewed as {dtype} {shape} (consistent)")
        }
        1 if !names.is_empty() => {
            let name = rng.pick(&names).clone();
            let entry = head[&name].take();
            let new = if rng.chance(1, 2) { "x".repeat(1 + rng.below(5000)) } else { "\u{0}\n\"\\🙂".into() };
            head.as_object_mut().expect("object").remove(&name);
            head[&new] = entry;
            format!("`{name}` renamed to a {}-byte name (consistent)", new.len())
        }
        2 => {
            let end = data.len();
            head["added.empty"] = json!({"dtype": "F32", "shape": [0, 7], "data_offsets": [end, end]});
            "an empty tensor added (consistent)".into()
        }
        _ => {
            head["__metadata__"] = json!({"format": "pt", "note": "ok ✓", "": ""});
            "string metadata (consistent)".into()
        }
    }
}

fn span_of(entry: &Value) -> usize {
    let off = |i: usize| entry["data_offsets"][i].as_u64().unwrap_or(0) as usize;
    off(1).saturating_sub(off(0))
}

/// A header field that lies about the data (the length field is recomputed afterwards).
fn header_lie(rng: &mut Rng, head: &mut Value, data: &mut Vec<u8>) -> String {
    let names = tensor_names(head);
    if names.is_empty() || rng.chance(1, 8) {
        return whole_header_lie(rng, head, data);
    }
    let name = rng.pick(&names).clone();
    let entry = &mut head[&name];
    if !entry.is_object() {
        return format!("`{name}` left as it is (already no object)");
    }
    let what = match rng.below(5) {
        0 => dtype_lie(rng, entry),
        1 => shape_lie(rng, entry),
        2 | 3 => offsets_lie(rng, entry, data.len()),
        _ => entry_lie(rng, entry),
    };
    format!("`{name}`: {what}")
}

fn dtype_lie(rng: &mut Rng, entry: &mut Value) -> String {
    let new: Value = match rng.below(4) {
        0 | 1 => rng.pick(DTYPES).0.into(),
        2 => rng.pick(&["F128", "f32", "", "F8_E4M3", "F4", "C64", "F32 "]).to_string().into(),
        _ => wrong_json_number(rng),
    };
    let text = format!("dtype {} -> {new}", entry["dtype"]);
    entry["dtype"] = new;
    text
}

fn shape_lie(rng: &mut Rng, entry: &mut Value) -> String {
    let mut dims: Vec<Value> = entry["shape"].as_array().cloned().unwrap_or_default();
    let what = match rng.below(5) {
        0 if !dims.is_empty() => {
            let i = rng.below(dims.len());
            dims[i] = lying_number(rng, dims[i].as_u64().unwrap_or(0)).into();
            "one dimension changed"
        }
        1 => {
            dims.push(lying_number(rng, 1).into());
            "a dimension added"
        }
        2 => {
            dims.pop();
            "a dimension dropped"
        }
        3 => {
            dims = vec![(1u64 << 62).into(), (1u64 << 62).into(), 0.into()];
            "dimensions whose product overflows before a zero"
        }
        _ => {
            dims.push(wrong_json_number(rng));
            "a dimension that is no unsigned integer"
        }
    };
    entry["shape"] = Value::Array(dims);
    format!("shape {what}: {}", entry["shape"])
}

fn offsets_lie(rng: &mut Rng, entry: &mut Value, data_len: usize) -> String {
    let (a, b) = (entry["data_offsets"][0].as_u64().unwrap_or(0), entry["data_offsets"][1].as_u64().unwrap_or(0));
    let new = match rng.below(7) {
        0 => json!([b, a]),
        1 => json!([a, lying_number(rng, b)]),
        2 => json!([lying_number(rng, a), b]),
        3 => json!([a.saturating_sub(1 + rng.below(4) as u64), b]),
        4 => json!([a, data_len as u64 + 1 + rng.below(8) as u64]),
        5 => json!([a, b, b]),
        _ => json!([wrong_json_number(rng), b]),
    };
    let text = format!("data_offsets [{a}, {b}] -> {new}");
    entry["data_offsets"] = new;
    text
}

fn entry_lie(rng: &mut Rng, entry: &mut Value) -> String {
    match rng.below(3) {
        0 => {
            let field = *rng.pick(&["dtype", "shape", "data_offsets"]);
            entry.as_object_mut().map(|m| m.remove(field));
            format!("field {field} removed")
        }
        1 => {
            entry["unknown_field"] = json!(1);
            "an unknown field added".into()
        }
        _ => {
            *entry = rng.pick(&[json!("F32"), json!([]), json!(null), json!(7)]).clone();
            format!("entry replaced by {entry}")
        }
    }
}

/// Lies about the header as a whole: metadata values that are not strings, a tensor outside
/// the data, a tensor removed (a hole), data truncated or extended by a few bytes.
fn whole_header_lie(rng: &mut Rng, head: &mut Value, data: &mut Vec<u8>) -> String {
    if !head.is_object() {
        return "header left as it is (already no object)".into();
    }
    match rng.below(5) {
        0 => {
            let v =
                rng.pick(&[json!({"format": 1}), json!({"a": null}), json!({"a": {"b": "c"}}), json!(["x"])]).clone();
            head["__metadata__"] = v.clone();
            format!("__metadata__ = {v}")
        }
        1 => {
            let end = data.len() as u64;
            head["ghost"] = json!({"dtype": "U8", "shape": [8], "data_offsets": [end, end + 8]});
            "a tensor past the end of the data".into()
        }
        2 => {
            let names = tensor_names(head);
            let first = names.first().cloned().unwrap_or_default();
            head.as_object_mut().map(|m| m.remove(&first));
            format!("tensor `{first}` removed from the header")
        }
        3 => {
            let n = 1 + rng.below(8);
            data.truncate(data.len().saturating_sub(n));
            format!("data {n} bytes shorter")
        }
        _ => {
            *head = rng.pick(&[json!([]), json!("header"), json!(null), json!(12)]).clone();
            format!("header replaced by {head}")
        }
    }
}

/// Edits of the header text the JSON model cannot express.
fn text_lie(rng: &mut Rng, text: &mut Vec<u8>) -> String {
    match rng.below(6) {
        0 | 1 => duplicate_key(rng, text),
        2 => {
            let at = rng.below(text.len() + 1);
            let bad = rng.pick(&[&[0xffu8][..], &[0xc3, 0x28], &[0x80], &[0xed, 0xa0, 0x80]]).to_vec();
            text.splice(at..at, bad.iter().copied());
            format!("invalid UTF-8 {bad:02x?} at header byte {at}")
        }
        3 => {
            let depth = 100 + rng.below(100_000);
            *text = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
            format!("header nested {depth} arrays deep")
        }
        4 => {
            let junk = rng.pick(&["x", "}", "\0\0\0\0", ",{}"]);
            text.extend_from_slice(junk.as_bytes());
            format!("{junk:?} after the header JSON")
        }
        _ => {
            let s = String::from_utf8_lossy(text).replacen("\"shape\":[", "\"shape\":[18446744073709551616,", 1);
            *text = s.into_bytes();
            "a dimension of 2^64 (does not fit u64)".into()
        }
    }
}

/// The same key twice: a copy of one entry (or of it with other offsets) before the closing
/// brace.
fn duplicate_key(rng: &mut Rng, text: &mut Vec<u8>) -> String {
    let Ok(head) = serde_json::from_slice::<Map<String, Value>>(text) else {
        return "duplicate key skipped (header is no object)".into();
    };
    let Some((name, entry)) = head.iter().nth(rng.below(head.len().max(1))) else {
        return "duplicate key skipped (empty header)".into();
    };
    let mut entry = entry.clone();
    if rng.chance(1, 2) && entry.get("data_offsets").is_some() {
        entry["data_offsets"] = json!([0, span_of(&entry)]);
    }
    let extra = format!(",{}:{}}}", Value::from(name.as_str()), entry);
    text.pop();
    text.extend_from_slice(extra.as_bytes());
    format!("key `{name}` repeated as {entry}")
}

/// A lying length field, or damage anywhere in the file.
fn byte_lie(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    if bytes.len() >= 8 && rng.chance(1, 2) {
        let honest = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let len = bytes.len() as u64;
        let new = match rng.below(4) {
            0 => lying_number(rng, honest),
            1 => 100_000_001,
            2 => len - 8 + rng.below(3) as u64,
            _ => honest.wrapping_add(8),
        };
        bytes[..8].copy_from_slice(&new.to_le_bytes());
        return format!("header length {honest} -> {new}");
    }
    damage_bytes(rng, bytes)
}
