//! Label caches: a valid cache written by the library's `CacheWriter` (classification rows or
//! top-k records), then header fields that lie (rows, classes, k, vocab, positions near 2^61 and
//! 2^64, wrong types, the other kind), data that lies (offset table, token ids, probabilities),
//! each with the checksum recomputed so that the checks beyond it are what meets the lie; and
//! raw damage, which the checksum should catch.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use symerge::labels::{CacheWriter, LabelKind, Provenance};

use super::{Rng, damage_bytes, lying_number, wrong_json_number};

/// Bytes of the header (magic and padded JSON) before the data; see src/labels/cache.rs.
pub const HEADER_BYTES: usize = 4096;
const MAGIC_BYTES: usize = 8;

pub struct Case {
    pub path: PathBuf,
    pub notes: Vec<String>,
}

pub fn provenance() -> Provenance {
    Provenance {
        task: "fuzz".into(),
        expert_hash: "e".repeat(64),
        tokenizer_hash: "t".repeat(64),
        inputs_hash: "i".repeat(64),
        max_len: Some(64),
    }
}

/// Writes the case for `seed` as `root/labels.cache`.
pub fn write_case(seed: u64, root: &Path) -> Case {
    let mut rng = Rng::new(seed);
    let path = root.join("labels.cache");
    let made = if rng.chance(1, 2) { write_topk(&mut rng, &path) } else { write_classification(&mut rng, &path) };
    let mut bytes = std::fs::read(&path).expect("cache");
    let mut notes = vec![made];
    let stages: Vec<usize> =
        if rng.chance(1, 10) { Vec::new() } else { (0..1 + rng.below(2)).map(|_| rng.below(10)).collect() };
    for s in stages.iter().filter(|&&s| s < 8) {
        notes.push(if *s < 5 { header_lie(&mut rng, &mut bytes) } else { data_lie(&mut rng, &mut bytes) });
    }
    for _ in stages.iter().filter(|&&s| s >= 8) {
        notes.push(format!("raw: {}", damage_bytes(&mut rng, &mut bytes)));
    }
    if stages.is_empty() {
        notes.push("unmutated".into());
    }
    std::fs::write(&path, bytes).expect("cache");
    Case { path, notes }
}

fn write_classification(rng: &mut Rng, path: &Path) -> String {
    let (rows, classes) = (rng.below(7), 1 + rng.below(6));
    let labels = if rng.chance(1, 2) { (0..classes).map(|c| format!("class {c}")).collect() } else { Vec::new() };
    let kind = LabelKind::Classification { classes };
    let mut w = CacheWriter::create(path, provenance(), kind, rows, labels).expect("writer");
    let logits: Vec<f32> = (0..rows * classes).map(|_| rng.small_float() * 2.0).collect();
    let mut probs = logits.clone();
    for row in probs.chunks_exact_mut(classes) {
        let z: f32 = row.iter().map(|x| x.exp()).sum();
        row.iter_mut().for_each(|x| *x = x.exp() / z);
    }
    w.append_classification(&probs, &logits).expect("rows");
    w.finish().expect("finish");
    format!("classification cache of {rows} rows x {classes} classes")
}

fn write_topk(rng: &mut Rng, path: &Path) -> String {
    let k = 1 + rng.below(4);
    let vocab = k + rng.below(21);
    let positions: Vec<usize> = (0..rng.below(5)).map(|_| rng.below(5)).collect();
    let total: usize = positions.iter().sum();
    let mut w = CacheWriter::create_topk(path, provenance(), k, vocab, &positions).expect("writer");
    let (mut ids, mut probs, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..total {
        let mut pool: Vec<u32> = (0..vocab as u32).collect();
        ids.extend((0..k).map(|_| pool.swap_remove(rng.below(pool.len()))));
        let mut w: Vec<f32> = (0..=k).map(|_| 0.01 + rng.small_float().abs()).collect();
        let z: f32 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= z);
        let r = w.pop().expect("rest");
        w.sort_by(|a, b| b.total_cmp(a));
        probs.extend(w);
        rest.push(r);
    }
    if total > 0 {
        w.append_topk(&ids, &probs, &rest).expect("records");
    }
    w.finish().expect("finish");
    format!("top-{k} cache over {vocab} tokens, positions {positions:?}")
}

/// The header JSON and the data, if the header region still parses.
fn split(bytes: &[u8]) -> Option<(Value, Vec<u8>)> {
    let json = bytes.get(MAGIC_BYTES..HEADER_BYTES)?.trim_ascii_end();
    Some((serde_json::from_slice(json).ok()?, bytes[HEADER_BYTES..].to_vec()))
}

/// Magic, header JSON padded with spaces (overflowing the header if too long), data; the
/// checksum recomputed unless `keep_hash`.
fn join(magic: &[u8], mut head: Value, data: &[u8], keep_hash: bool) -> Vec<u8> {
    if !keep_hash && head.is_object() {
        head["data_hash"] = blake3::hash(data).to_hex().to_string().into();
    }
    let mut out = magic.to_vec();
    out.extend(serde_json::to_vec(&head).expect("JSON"));
    if out.len() < HEADER_BYTES {
        out.resize(HEADER_BYTES, b' ');
    }
    out.extend_from_slice(data);
    out
}

/// The header's kind as (name, its object), e.g. ("top_k", {"k": 2, "vocab": 9}).
fn kind_of(head: &Value) -> Option<(String, Value)> {
    let (name, body) = head.get("kind")?.as_object()?.iter().next()?;
    Some((name.clone(), body.clone()))
}

/// A header field that lies; the checksum is recomputed (except when the lie is about it).
fn header_lie(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    let Some((mut head, mut data)) = split(bytes) else { return "header lie skipped (header unreadable)".into() };
    if !head.is_object() {
        return "header lie skipped (no object)".into();
    }
    let magic = bytes[..MAGIC_BYTES].to_vec();
    let mut keep_hash = false;
    let what = match rng.below(12) {
        0 | 1 => number_lie(rng, &mut head, "rows"),
        2 | 3 => kind_lie(rng, &mut head),
        4 => number_lie(rng, &mut head, "positions"),
        5 => number_lie(rng, &mut head, "format_version"),
        6 => {
            let d = rng.pick(&["f16", "f32", "bf16", ""]);
            head["dtype"] = (*d).into();
            format!("dtype = {d}")
        }
        7 => {
            keep_hash = true;
            let v = rng.pick(&[json!(null), json!("00"), json!(5)]).clone();
            head["data_hash"] = v.clone();
            format!("data_hash = {v}")
        }
        8 => {
            let v = rng.pick(&[json!(["a"]), json!([1, 2]), json!("labels"), json!(["x".repeat(5000)])]).clone();
            head["labels"] = v;
            "labels lie".into()
        }
        9 => {
            let field = *rng.pick(&["task", "kind", "rows", "complete", "dtype", "format_version"]);
            head.as_object_mut().map(|m| m.remove(field));
            format!("field {field} removed")
        }
        10 => {
            head["complete"] = rng.pick(&[json!(false), json!("yes"), json!(1)]).clone();
            format!("complete = {}", head["complete"])
        }
        _ => fewer_rows(rng, &mut head, &mut data),
    };
    *bytes = join(&magic, head, &data, keep_hash);
    what
}

fn number_lie(rng: &mut Rng, head: &mut Value, field: &str) -> String {
    let honest = head[field].as_u64().unwrap_or(0);
    let v = if rng.chance(1, 5) { wrong_json_number(rng) } else { lying_number(rng, honest).into() };
    head[field] = v.clone();
    format!("{field} {honest} -> {v}")
}

/// classes, k or vocab lie, or the kind is swapped for the other one or for nonsense.
fn kind_lie(rng: &mut Rng, head: &mut Value) -> String {
    let Some((name, body)) = kind_of(head) else { return "kind lie skipped".into() };
    let new = match rng.below(4) {
        0 => {
            let fields: Vec<String> = body.as_object().map_or(Vec::new(), |m| m.keys().cloned().collect());
            let Some(f) = fields.get(rng.below(fields.len())).cloned() else { return "kind lie skipped".into() };
            let mut body = body.clone();
            body[&f] = lying_number(rng, body[&f].as_u64().unwrap_or(0)).into();
            json!({ name: body })
        }
        1 if name == "classification" => json!({"top_k": {"k": 1 + rng.below(3), "vocab": 1 + rng.below(9)}}),
        1 => json!({"classification": {"classes": 1 + rng.below(6)}}),
        2 => json!({ name: {} }),
        _ => rng.pick(&[json!("classification"), json!({"regression": {}}), json!(null), json!([])]).clone(),
    };
    let text = format!("kind {} -> {new}", head["kind"]);
    head["kind"] = new;
    text
}

/// A consistent cache of fewer rows (classification): it must still open.
fn fewer_rows(rng: &mut Rng, head: &mut Value, data: &mut Vec<u8>) -> String {
    let classes = match kind_of(head) {
        Some((name, body)) if name == "classification" => body["classes"].as_u64().unwrap_or(0) as usize,
        _ => return number_lie(rng, head, "rows"),
    };
    let rows = head["rows"].as_u64().unwrap_or(0);
    let keep = rng.below(rows as usize + 1);
    data.truncate(keep.saturating_mul(4 * classes));
    head["rows"] = keep.into();
    format!("rows {rows} -> {keep}, data cut to match (consistent)")
}

/// Data that lies, checksum recomputed: the top-k offset table, a token id, a probability or
/// logit, or the data's length.
fn data_lie(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    let Some((head, mut data)) = split(bytes) else { return "data lie skipped (header unreadable)".into() };
    let magic = bytes[..MAGIC_BYTES].to_vec();
    let rows = head["rows"].as_u64().unwrap_or(0) as usize;
    let what = match (kind_of(&head), rng.below(4)) {
        (Some((name, body)), 0 | 1) if name == "top_k" => topk_lie(rng, &mut data, rows, &body),
        (Some((name, body)), 0 | 1) if name == "classification" => {
            let classes = body["classes"].as_u64().unwrap_or(1) as usize;
            let at = rng.below(data.len() / 2) * 2;
            let v = *rng.pick(&[f32::NAN, -1.0, 2.0, f32::INFINITY, 65504.0]);
            if data.len() >= 2 {
                data[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
            let part = if (at / 2) % classes.max(1).saturating_mul(2) < classes { "probability" } else { "logit" };
            format!("{part} at data byte {at} = {v}")
        }
        (_, 2) => {
            let n = 1 + rng.below(16);
            data.truncate(data.len().saturating_sub(n));
            format!("data {n} bytes shorter")
        }
        _ => {
            let n = 1 + rng.below(16);
            data.extend(rng.bytes(n));
            format!("data {n} bytes longer")
        }
    };
    *bytes = join(&magic, head, &data, false);
    what
}

fn topk_lie(rng: &mut Rng, data: &mut [u8], rows: usize, body: &Value) -> String {
    let (k, vocab) = (body["k"].as_u64().unwrap_or(1).min(1 << 20) as usize, body["vocab"].as_u64().unwrap_or(1));
    let Some(table) = rows.checked_add(1).and_then(|r| r.checked_mul(8)).filter(|&t| t <= data.len()) else {
        return "top-k lie skipped (no table)".into();
    };
    let (tab, records) = data.split_at_mut(table);
    let rec = 8 * k + 4;
    match rng.below(3) {
        0 => {
            let i = rng.below(rows + 1);
            let honest = u64::from_le_bytes(tab[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            let v = lying_number(rng, honest);
            tab[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
            format!("offset table entry {i}: {honest} -> {v}")
        }
        1 if records.len() >= rec => {
            let at = rng.below(records.len() / rec) * rec + 4 * rng.below(k);
            let v = if rng.chance(1, 2) { vocab as u32 } else { u32::MAX };
            records[at..at + 4].copy_from_slice(&v.to_le_bytes());
            format!("token id at record byte {at} = {v} (vocab {vocab})")
        }
        _ if records.len() >= rec => {
            let at = rng.below(records.len() / rec) * rec + 4 * k + 4 * rng.below(k + 1);
            let v = *rng.pick(&[f32::NAN, -0.5, 1.5, f32::INFINITY, 0.0]);
            records[at..at + 4].copy_from_slice(&v.to_le_bytes());
            format!("probability at record byte {at} = {v}")
        }
        _ => "top-k lie skipped (no records)".into(),
    }
}
