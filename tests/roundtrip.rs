//! The streaming shard writer against the safetensors reference reader: bit-exact round trips,
//! a correct Hugging Face index, and the shard-size limit.

mod common;

use std::collections::BTreeMap;

use common::{T, from_bytes, randoms, read_model, to_bytes, write_file};
use safetensors::Dtype;
use symerge::checkpoint::{Checkpoint, PlannedTensor, ShardWriter};

fn tensors() -> Vec<T> {
    let mut out = Vec::new();
    for i in 0..40 {
        let dtype = [Dtype::F32, Dtype::F16, Dtype::BF16][i % 3];
        let shape = vec![1 + (i * 37) % 50, 3 + i % 7];
        let n = shape.iter().product();
        out.push(T::new(&format!("model.layers.{}.w{i}.weight", i / 4), dtype, &shape, randoms(i as u64, n, 2.0)));
    }
    out.push(T::new("model.embed_tokens.weight", Dtype::BF16, &[300, 16], randoms(99, 4800, 1.0)));
    out.push(T::new("buffers.ids", Dtype::I64, &[7], (0..7).map(|x| x as f64).collect()));
    out.push(T::new("buffers.empty", Dtype::F32, &[0, 4], vec![]));
    out
}

fn write_sharded(dir: &std::path::Path, ts: &[T], limit: u64) -> usize {
    let planned =
        ts.iter().map(|t| PlannedTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    let mut w = ShardWriter::create(dir, planned, limit).unwrap();
    let shards = w.num_shards();
    for t in ts {
        let bytes = to_bytes(t.dtype, &t.values);
        // Feed in uneven pieces: the writer must not care how data is chunked.
        for piece in bytes.chunks(777) {
            w.write(&t.name, piece).unwrap();
        }
    }
    w.finish().unwrap();
    shards
}

#[test]
fn sharded_write_reads_back_bit_exact_with_index() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = tensors();
    let limit = 4096;
    let shards = write_sharded(tmp.path(), &ts, limit);
    assert!(shards > 3, "small limit gives many shards, got {shards}");

    // Bit-exact, via the reference reader.
    let back = read_model(tmp.path());
    assert_eq!(back.len(), ts.len());
    for t in &ts {
        let (dt, shape, values) = &back[&t.name];
        assert_eq!(*dt, t.dtype, "{}", t.name);
        assert_eq!(*shape, t.shape, "{}", t.name);
        assert_eq!(to_bytes(*dt, values), to_bytes(t.dtype, &t.values), "{}", t.name);
    }

    // Index: every tensor mapped to the shard that holds it, total_size = sum of data bytes.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), ts.len());
    let mut total = 0u64;
    let mut per_shard: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen_in_order = Vec::new();
    for t in &ts {
        let file = map[&t.name].as_str().unwrap();
        assert!(file.starts_with("model-") && file.ends_with(&format!("-of-{shards:05}.safetensors")), "{file}");
        let data = std::fs::read(tmp.path().join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&data).unwrap();
        assert!(st.tensor(&t.name).is_ok(), "{} not in {file}", t.name);
        let nbytes = to_bytes(t.dtype, &t.values).len() as u64;
        total += nbytes;
        *per_shard.entry(file.to_string()).or_default() += nbytes;
        seen_in_order.push(file.to_string());
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    // Shards are filled in input order and each respects the limit (the embedding, 9600 bytes,
    // is larger than the limit and gets a shard of its own).
    let mut sorted = seen_in_order.clone();
    sorted.sort();
    assert_eq!(seen_in_order, sorted, "tensors keep the input order across shards");
    for (file, bytes) in &per_shard {
        let data = std::fs::read(tmp.path().join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&data).unwrap();
        assert!(*bytes <= limit || st.len() == 1, "{file} holds {bytes} bytes in {} tensors", st.len());
        let header_len = u64::from_le_bytes(data[..8].try_into().unwrap());
        assert_eq!((8 + header_len) % 8, 0, "{file}: data is 8-byte aligned");
    }

    // Our own reader sees the same bytes, in the same order.
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
    let want: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, want);
    for t in &ts {
        let m = ck.get(&t.name).unwrap();
        assert_eq!(ck.bytes(m), to_bytes(t.dtype, &t.values).as_slice());
    }
}

#[test]
fn one_shard_is_model_safetensors_without_index() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = tensors();
    assert_eq!(write_sharded(tmp.path(), &ts, 5_000_000_000), 1);
    assert!(tmp.path().join("model.safetensors").is_file());
    assert!(!tmp.path().join("model.safetensors.index.json").exists());
    assert_eq!(read_model(tmp.path()).len(), ts.len());
}

#[test]
fn reader_opens_files_written_by_the_reference_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = tensors();
    let file = tmp.path().join("weights.safetensors");
    write_file(&file, &ts);
    for path in [file.clone(), tmp.path().to_path_buf()] {
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.tensors.len(), ts.len());
        for t in &ts {
            let m = ck.get(&t.name).unwrap();
            assert_eq!(m.shape, t.shape);
            assert_eq!(from_bytes(t.dtype, ck.bytes(m)), from_bytes(t.dtype, &to_bytes(t.dtype, &t.values)));
        }
    }
    // Prefixed names resolve both ways (BertForSequenceClassification vs BertModel).
    let ck = Checkpoint::open(&file).unwrap();
    assert!(ck.resolve("bert.model.embed_tokens.weight").is_some());
    assert!(ck.resolve("embed_tokens.weight").is_some());
    assert!(ck.resolve("nope.weight").is_none());
}

/// An empty tensor may be written explicitly (zero bytes, as a copy loop does) or not at all,
/// wherever it falls: between others, last, or several in a row. Both give the same file.
#[test]
fn empty_tensors_may_be_written_or_skipped() {
    let ts = [
        T::new("a", Dtype::F32, &[2], vec![1.0, 2.0]),
        T::new("empty.0", Dtype::I64, &[0, 2], vec![]),
        T::new("empty.1", Dtype::F16, &[3, 0], vec![]),
        T::new("b", Dtype::BF16, &[], vec![0.5]),
        T::new("empty.last", Dtype::F32, &[0], vec![]),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    // Each run leaves out the writes of these empty tensors.
    let all: &[&str] = &["empty.0", "empty.1", "empty.last"];
    for (run, left_out) in [("explicit", &[][..]), ("skipped", all), ("some", &["empty.0"][..])] {
        let dir = tmp.path().join(run);
        std::fs::create_dir(&dir).unwrap();
        let planned = ts.iter().map(|t| PlannedTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() });
        let mut w = ShardWriter::create(&dir, planned.collect(), 1 << 30).unwrap();
        for t in ts.iter().filter(|t| !left_out.contains(&t.name.as_str())) {
            w.write(&t.name, &to_bytes(t.dtype, &t.values)).unwrap_or_else(|e| panic!("{run}: {e}"));
        }
        w.finish().unwrap();
        assert_eq!(read_model(&dir).len(), ts.len(), "{run}");
        files.push(std::fs::read(dir.join("model.safetensors")).unwrap());
    }
    assert!(files.iter().all(|f| *f == files[0]));
}
