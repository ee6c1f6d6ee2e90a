//! Sharded checkpoints: valid shards and their `model.safetensors.index.json`, then an index
//! that lies (a shard that is missing, a directory, a FIFO, outside the checkpoint; a tensor in
//! the wrong shard; no object where one belongs; thousands of entries) or a shard that
//! is damaged or stored twice.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::safetensors::{Model, random_model};
use super::{Rng, damage_bytes, wrong_json_number};

pub const INDEX: &str = "model.safetensors.index.json";

/// A written case: the checkpoint directory and what was done to it.
pub struct Case {
    pub dir: PathBuf,
    pub notes: Vec<String>,
    /// Open the index file itself rather than its directory.
    pub open_index: bool,
}

struct Shards {
    dir: PathBuf,
    files: Vec<(String, Model)>,
}

/// Writes the case for `seed` under `root` (the checkpoint is `root/ckpt`, so `../` names
/// stay inside `root`).
pub fn write_case(seed: u64, root: &Path) -> Case {
    let mut rng = Rng::new(seed);
    let dir = root.join("ckpt");
    std::fs::create_dir_all(&dir).expect("case directory");
    let n = 1 + rng.below(3);
    let files = (0..n)
        .map(|i| (format!("model-{:05}-of-{n:05}.safetensors", i + 1), random_model(&mut rng, &format!("s{i}."))))
        .collect();
    let shards = Shards { dir: dir.clone(), files };
    for (name, model) in &shards.files {
        std::fs::write(dir.join(name), model.bytes()).expect("shard");
    }
    std::fs::write(dir.join("config.json"), r#"{"model_type": "test"}"#).expect("config");
    let mut index = json!({"metadata": {"total_size": 0}, "weight_map": shards.weight_map()});
    let mut notes = vec![format!("{n} shards, {} tensors", shards.weight_map().len())];
    let lies = if rng.chance(1, 10) { 0 } else { 1 + rng.below(2) };
    for _ in 0..lies {
        notes.push(index_lie(&mut rng, &shards, &mut index));
    }
    let mut text = serde_json::to_vec(&index).expect("JSON");
    if rng.chance(1, 12) {
        notes.push(format!("index text: {}", damage_bytes(&mut rng, &mut text)));
    }
    std::fs::write(dir.join(INDEX), text).expect("index");
    Case { dir, notes, open_index: rng.chance(1, 3) }
}

impl Shards {
    fn weight_map(&self) -> Map<String, Value> {
        let mut map = Map::new();
        for (file, model) in &self.files {
            for t in &model.tensors {
                map.insert(t.name.clone(), file.as_str().into());
            }
        }
        map
    }
}

/// One lie: about where tensors are (an entry), about the index's shape, or about a shard file.
fn index_lie(rng: &mut Rng, shards: &Shards, index: &mut Value) -> String {
    match rng.below(10) {
        0..=3 => entry_lie(rng, shards, index),
        4 | 5 => shape_lie(rng, index),
        6..=8 => shard_lie(rng, shards),
        _ => duplicate_tensor(rng, shards),
    }
}

/// A weight_map entry (an existing one, or a new one) pointing somewhere it should not.
fn entry_lie(rng: &mut Rng, shards: &Shards, index: &mut Value) -> String {
    let Some(map) = index.get_mut("weight_map").and_then(Value::as_object_mut) else {
        return "entry lie skipped (no weight_map object)".into();
    };
    let names: Vec<String> = map.keys().cloned().collect();
    let tensor = if names.is_empty() || rng.chance(1, 5) { "ghost.weight".into() } else { rng.pick(&names).clone() };
    let target = entry_target(rng, shards);
    let what = format!("`{tensor}` -> {target}");
    if rng.chance(1, 8) {
        map.remove(&tensor);
        return format!("entry `{tensor}` dropped");
    }
    map.insert(tensor, target);
    what
}

fn entry_target(rng: &mut Rng, shards: &Shards) -> Value {
    let valid = shards.files[0].1.bytes();
    let dir = &shards.dir;
    let write = |path: PathBuf| {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(&path, &valid).expect("file");
    };
    match rng.below(9) {
        0 => "model-00009-of-00009.safetensors".into(),
        1 => {
            std::fs::create_dir_all(dir.join("dir.safetensors")).expect("dir");
            "dir.safetensors".into()
        }
        2 => {
            write(dir.join("../outside.safetensors"));
            "../outside.safetensors".into()
        }
        3 => {
            write(dir.join("sub/inner.safetensors"));
            "sub/inner.safetensors".into()
        }
        4 => dir.join(&shards.files[0].0).to_string_lossy().into_owned().into(),
        5 => rng.pick(&["", ".", "..", "a\0b.safetensors", INDEX, "config.json", "sub/", "./x"]).to_string().into(),
        6 => rng.pick(&shards.files).0.as_str().into(),
        7 => wrong_json_number(rng),
        _ => json!({"file": "x"}),
    }
}

/// The index or its weight_map is not the object it should be, or is huge.
fn shape_lie(rng: &mut Rng, index: &mut Value) -> String {
    match rng.below(5) {
        0 if index.is_object() => {
            let v = rng.pick(&[json!([]), json!("map"), json!(5), json!(null), json!({})]).clone();
            index["weight_map"] = v.clone();
            format!("weight_map = {v}")
        }
        1 => {
            index.as_object_mut().map(|m| m.remove("weight_map"));
            "weight_map removed".into()
        }
        2 => {
            *index = rng.pick(&[json!([]), json!("index"), json!(null), json!(1)]).clone();
            format!("index = {index}")
        }
        3 => {
            let n = 8_000 + rng.below(8_000);
            let existing = index.get("weight_map").and_then(|m| m.as_object()?.values().next().cloned());
            let map = index.get_mut("weight_map").and_then(Value::as_object_mut);
            let (Some(map), Some(file)) = (map, existing) else { return "huge skipped (no entries)".into() };
            for i in 0..n {
                map.insert(format!("ghost.{i}"), file.clone());
            }
            format!("{n} entries for tensors no shard holds")
        }
        _ => {
            let n = 2_000 + rng.below(3_000);
            let map = index.get_mut("weight_map").and_then(Value::as_object_mut);
            let Some(map) = map else { return "huge skipped (no weight_map)".into() };
            for i in 0..n {
                map.insert(format!("ghost.{i}"), format!("shard-{i}.safetensors").into());
            }
            format!("{n} entries in {n} shards that do not exist")
        }
    }
}

/// A shard file that is gone, a dangling link, a FIFO, a directory, empty or damaged; or a
/// link to a valid copy (still a valid checkpoint).
fn shard_lie(rng: &mut Rng, shards: &Shards) -> String {
    let (name, model) = rng.pick(&shards.files);
    let path = shards.dir.join(name);
    clear(&path);
    match rng.below(7) {
        0 => format!("shard {name} removed"),
        1 => {
            std::os::unix::fs::symlink(shards.dir.join("nowhere"), &path).expect("symlink");
            format!("shard {name} a dangling link")
        }
        2 => {
            make_fifo(&path);
            format!("shard {name} a FIFO")
        }
        3 => {
            std::fs::create_dir(&path).expect("dir");
            format!("shard {name} a directory")
        }
        4 => {
            let copy = shards.dir.join("../copy.bin");
            std::fs::write(&copy, model.bytes()).expect("copy");
            std::os::unix::fs::symlink(&copy, &path).expect("symlink");
            format!("shard {name} a link to a valid copy (consistent)")
        }
        _ => {
            let mut bytes = model.bytes();
            let what = damage_bytes(rng, &mut bytes);
            std::fs::write(&path, bytes).expect("shard");
            format!("shard {name}: {what}")
        }
    }
}

/// Removes whatever an earlier lie left at `path` (a file, link, FIFO or directory); writing to
/// a FIFO left there would block.
fn clear(path: &Path) {
    if std::fs::remove_file(path).is_err() {
        let _ = std::fs::remove_dir_all(path);
    }
}

fn make_fifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file system entry.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// A tensor of one shard stored again in another.
fn duplicate_tensor(rng: &mut Rng, shards: &Shards) -> String {
    let with_tensors: Vec<&(String, Model)> = shards.files.iter().filter(|(_, m)| !m.tensors.is_empty()).collect();
    if shards.files.len() < 2 || with_tensors.is_empty() {
        return "duplicate skipped (fewer than two shards)".into();
    }
    let (from, model) = rng.pick(&with_tensors);
    let (to, other) = shards.files.iter().find(|(n, _)| n != from).expect("a second shard");
    let mut twice = other.clone();
    twice.tensors.push(rng.pick(&model.tensors).clone());
    clear(&shards.dir.join(to));
    std::fs::write(shards.dir.join(to), twice.bytes()).expect("shard");
    format!("a tensor of {from} stored in {to} too")
}
