//! The soft-label cache: values survive the f16 round trip, a killed writer resumes where it
//! stopped and produces the same bytes as an uninterrupted one, and corrupt, truncated,
//! unfinished or mismatched caches are rejected with an error naming the cause.

mod common;

use rand::{Rng, SeedableRng};
use symerge::backend::Cpu;
use symerge::labels::cache::partial_path;
use symerge::labels::fingerprint::texts_hash;
use symerge::labels::produce::{CacheLabelsOptions, cache_labels, provenance as expert_provenance};
use symerge::labels::{CacheWriter, LabelCache, LabelKind, Provenance};

const C: usize = 5;

fn provenance(task: &str) -> Provenance {
    Provenance {
        task: task.into(),
        expert_hash: "e".repeat(64),
        tokenizer_hash: "t".repeat(64),
        inputs_hash: texts_hash(&["a", "b"]),
        max_len: Some(64),
    }
}

/// Seeded rows: logits in [-8, 8) and their softmax.
fn rows(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let logits: Vec<f32> = (0..n * C).map(|_| rng.random_range(-8.0..8.0)).collect();
    let mut probs = logits.clone();
    for r in probs.chunks_exact_mut(C) {
        let m = r.iter().cloned().fold(f32::MIN, f32::max);
        let z: f32 = r.iter().map(|x| (x - m).exp()).sum();
        r.iter_mut().for_each(|x| *x = (*x - m).exp() / z);
    }
    (probs, logits)
}

fn write_all(path: &std::path::Path, n: usize) {
    let (p, l) = rows(n, 7);
    let mut w =
        CacheWriter::create(path, provenance("wn-verb"), LabelKind::Classification { classes: C }, n, vec![]).unwrap();
    for (pc, lc) in p.chunks(3 * C).zip(l.chunks(3 * C)) {
        w.append_classification(pc, lc).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn round_trip_keeps_values_within_f16_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.cache");
    let n = 37;
    write_all(&path, n);
    let cache = LabelCache::open(&path, Some(&provenance("wn-verb"))).unwrap();
    assert_eq!((cache.rows(), cache.classes()), (n, C));
    let (p, l) = rows(n, 7);
    for i in 0..n {
        for (got, want) in cache.probs(i).iter().zip(&p[i * C..(i + 1) * C]) {
            assert!((got - want).abs() <= want.abs() * 1e-3 + 1e-7, "row {i}: prob {got} vs {want}");
        }
        for (got, want) in cache.logits(i).iter().zip(&l[i * C..(i + 1) * C]) {
            assert!((got - want).abs() <= want.abs() * 1e-3 + 1e-3, "row {i}: logit {got} vs {want}");
        }
        let sum: f32 = cache.probs(i).iter().sum();
        assert!((sum - 1.0).abs() < 5e-3, "row {i} sums to {sum}");
    }
    assert_eq!(cache.probs_batch(&[3, 1]), [cache.probs(3), cache.probs(1)].concat());
    assert!(!partial_path(&path).exists());
}

#[test]
fn killed_writer_resumes_to_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.cache");
    write_all(&whole, 20);

    let path = dir.path().join("resumed.cache");
    let (p, l) = rows(20, 7);
    let kind = LabelKind::Classification { classes: C };
    {
        let mut w = CacheWriter::create(&path, provenance("wn-verb"), kind, 20, vec![]).unwrap();
        w.append_classification(&p[..8 * C], &l[..8 * C]).unwrap();
        w.flush().unwrap();
        // Dropped without finish: as if killed.
    }
    // A torn half row at the end, as a kill during a write leaves.
    let partial = partial_path(&path);
    let len = std::fs::metadata(&partial).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&partial).unwrap().set_len(len + 3).unwrap();
    assert!(!path.exists(), "an unfinished cache must not appear at its final path");

    let mut w = CacheWriter::create(&path, provenance("wn-verb"), kind, 20, vec![]).unwrap();
    assert_eq!(w.rows_written(), 8);
    w.append_classification(&p[8 * C..], &l[8 * C..]).unwrap();
    w.finish().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&whole).unwrap());

    // A partial file from a different task is not continued.
    {
        let mut w = CacheWriter::create(&path, provenance("other"), kind, 20, vec![]).unwrap();
        w.append_classification(&p[..4 * C], &l[..4 * C]).unwrap();
        w.flush().unwrap();
    }
    let w = CacheWriter::create(&path, provenance("wn-verb"), kind, 20, vec![]).unwrap();
    assert_eq!(w.rows_written(), 0);
}

/// Two writers of one cache (two runs with the same `-o`): the second is refused while the first
/// writes, so their rows never interleave in one file; once the first is done, a new writer of
/// the same path starts (or resumes) as usual.
#[test]
fn a_second_writer_of_one_cache_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.cache");
    let kind = LabelKind::Classification { classes: C };
    let (p, l) = rows(6, 3);
    let mut first = CacheWriter::create(&path, provenance("wn-verb"), kind, 6, vec![]).unwrap();
    first.append_classification(&p[..2 * C], &l[..2 * C]).unwrap();
    first.flush().unwrap();
    let partial_before = std::fs::read(partial_path(&path)).unwrap();
    for other in [provenance("wn-verb"), provenance("wn-noun")] {
        let err = CacheWriter::create(&path, other, kind, 6, vec![]).err().expect("refused while the first writes");
        assert!(err.to_string().contains("another run is writing"), "{err}");
    }
    assert_eq!(std::fs::read(partial_path(&path)).unwrap(), partial_before, "the refused writers left it alone");
    first.append_classification(&p[2 * C..], &l[2 * C..]).unwrap();
    first.finish().unwrap();
    LabelCache::open(&path, Some(&provenance("wn-verb"))).unwrap();
    let again = CacheWriter::create(&path, provenance("wn-noun"), kind, 6, vec![]).unwrap();
    assert_eq!(again.rows_written(), 0);
}

fn open_err(path: &std::path::Path, want: Option<&Provenance>) -> String {
    match LabelCache::open(path, want) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_caches_are_rejected_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.cache");
    write_all(&path, 10);
    let good = std::fs::read(&path).unwrap();

    for (field, want) in [
        ("task", Provenance { task: "wn-noun".into(), ..provenance("wn-verb") }),
        ("expert checkpoint", Provenance { expert_hash: "x".into(), ..provenance("wn-verb") }),
        ("tokenizer", Provenance { tokenizer_hash: "x".into(), ..provenance("wn-verb") }),
        ("inputs", Provenance { inputs_hash: texts_hash(&["a", "c"]), ..provenance("wn-verb") }),
    ] {
        let err = open_err(&path, Some(&want));
        assert!(err.contains(&format!("different {field}")) && err.contains("labels.cache"), "{err}");
        assert!(err.contains("cache-labels ... --force"), "says how to rebuild it: {err}");
    }
    // A different maximum length is named as such, with both ways out: the hashes alone told
    // a user nothing (walkthrough).
    let want = Provenance { max_len: Some(128), tokenizer_hash: "x".into(), ..provenance("wn-verb") };
    let err = open_err(&path, Some(&want));
    assert!(err.contains("made with --max-len 64, this run uses 128") && err.contains("max_len: 64"), "{err}");

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    std::fs::write(&path, &flipped).unwrap();
    assert!(open_err(&path, None).contains("checksum"));

    std::fs::write(&path, &good[..good.len() - 2]).unwrap();
    assert!(open_err(&path, None).contains("truncated"));

    std::fs::write(&path, b"not a cache at all").unwrap();
    assert!(open_err(&path, None).contains("bad magic"));

    let mut header = good.clone();
    header[8] = b'[';
    std::fs::write(&path, &header).unwrap();
    assert!(open_err(&path, None).contains("corrupt header"));

    // A cache whose writer never finished is only a .partial file, and refuses to finish short.
    let short = dir.path().join("short.cache");
    let mut w =
        CacheWriter::create(&short, provenance("t"), LabelKind::Classification { classes: C }, 4, vec![]).unwrap();
    let (p, l) = rows(2, 1);
    w.append_classification(&p, &l).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("2 of 4 rows"), "{err}");
    assert!(!short.exists());
    assert!(open_err(&short, None).contains("short.cache"));
}

/// Rewrites a finished cache's header (as JSON) and data, with a freshly computed checksum: what
/// a lying but self-consistent file looks like.
fn rewrite(path: &std::path::Path, edit: impl Fn(&mut serde_json::Value, &mut Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let (head, data) = bytes.split_at(4096);
    let start = head.iter().position(|&b| b == b'{').unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(head[start..].trim_ascii_end()).unwrap();
    let mut data = data.to_vec();
    edit(&mut json, &mut data);
    json["data_hash"] = blake3::hash(&data).to_hex().to_string().into();
    let mut out = head[..start].to_vec();
    out.extend(serde_json::to_vec(&json).unwrap());
    out.resize(4096, b' ');
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn lying_headers_and_values_that_are_not_distributions_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.cache");
    let fresh = || {
        write_all(&path, 6);
        LabelCache::open(&path, None).unwrap();
    };
    type Edit = Box<dyn Fn(&mut serde_json::Value, &mut Vec<u8>)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("overflow", Box::new(|h, _| h["rows"] = (1u64 << 61).into())),
        ("bytes, but", Box::new(|h, _| h["rows"] = 0.into())),
        ("not in [0, 1]", Box::new(|_, d| d[..2].copy_from_slice(&half::f16::from_f32(-5.0).to_le_bytes()))),
        ("not in [0, 1]", Box::new(|_, d| d[2..4].copy_from_slice(&half::f16::from_f32(7.0).to_le_bytes()))),
        (
            "sum to",
            Box::new(|_, d| {
                for c in 0..C {
                    d[2 * c..2 * c + 2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
                }
            }),
        ),
        ("logit", Box::new(|_, d| d[4 * C - 2..4 * C].copy_from_slice(&half::f16::INFINITY.to_le_bytes()))),
        ("class names", Box::new(|h, _| h["labels"] = serde_json::json!(["a", "b", "c", "d", "e", "f"]))),
        (
            "zero classes",
            Box::new(|h, d| {
                h["kind"] = serde_json::json!({"classification": {"classes": 0}});
                d.clear();
            }),
        ),
    ];
    for (want, edit) in &cases {
        fresh();
        rewrite(&path, edit);
        let e = open_err(&path, None);
        assert!(e.contains(want), "{want}: {e}");
    }
    // A consistent cache of fewer rows opens; `adapt` compares its rows with its inputs.
    fresh();
    rewrite(&path, |h: &mut serde_json::Value, d: &mut Vec<u8>| {
        h["rows"] = 5.into();
        d.truncate(5 * 4 * C);
    });
    assert_eq!(LabelCache::open(&path, None).unwrap().rows(), 5);
}

/// A partial whose rows were changed after they were written is started over, and the finished
/// cache equals one written in one go: changed rows are recomputed, never sealed with a fresh
/// checksum. Fuzzing round 6: a flipped low bit of an f16 value still looks like a label (only
/// values that are no distribution were caught), so the rows are checked against the checksum
/// the partial's header recorded at their flush. Rows written after the last flush (a run killed
/// before its header said so) are recomputed too.
#[test]
fn a_changed_partial_is_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.cache");
    write_all(&whole, 12);
    let path = dir.path().join("resumed.cache");
    let (p, l) = rows(12, 7);
    let kind = LabelKind::Classification { classes: C };
    let partial = partial_path(&path);
    let row3 = 4096 + 3 * 4 * C;
    let low_bit = |b: &mut Vec<u8>| b[row3] ^= 1;
    let no_label = |b: &mut Vec<u8>| b[row3..row3 + 2].copy_from_slice(&half::f16::MAX.to_le_bytes());
    for (change, kept) in [(None, 8), (Some(&low_bit as &dyn Fn(&mut Vec<u8>)), 0), (Some(&no_label), 0)] {
        {
            let mut w = CacheWriter::create(&path, provenance("wn-verb"), kind, 12, vec![]).unwrap();
            w.append_classification(&p[..8 * C], &l[..8 * C]).unwrap();
            w.flush().unwrap();
            // Written but never flushed: the header does not vouch for it.
            w.append_classification(&p[8 * C..9 * C], &l[8 * C..9 * C]).unwrap();
            drop(w);
        }
        if let Some(change) = change {
            let mut bytes = std::fs::read(&partial).unwrap();
            change(&mut bytes);
            std::fs::write(&partial, bytes).unwrap();
        }
        let mut w = CacheWriter::create(&path, provenance("wn-verb"), kind, 12, vec![]).unwrap();
        assert_eq!(w.rows_written(), kept);
        w.append_classification(&p[kept * C..], &l[kept * C..]).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&whole).unwrap());
        std::fs::remove_file(&path).unwrap();
    }
}

/// A cache path that is a directory is refused naming it and saying what it is (mapping it gave
/// "No such device").
#[test]
fn a_directory_is_no_cache() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_err(dir.path(), None);
    assert!(e.contains(&format!("{} is a directory", dir.path().display())), "{e}");
}

/// The expert's fingerprint covers its config.json's values (activation, norm epsilon, label
/// names change what the weights compute), not its formatting: a cache made before such an
/// edit is not reused for the edited expert.
#[test]
fn the_expert_fingerprint_covers_its_config() {
    use symerge::checkpoint::Checkpoint;
    use symerge::labels::fingerprint::checkpoint_hash;
    let tmp = tempfile::tempdir().unwrap();
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mergekit/expert-1");
    let dir = tmp.path().join("e");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fx.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("config.json")).unwrap()).unwrap();
    let hash_with = |text: String| {
        std::fs::write(dir.join("config.json"), text).unwrap();
        checkpoint_hash(&Checkpoint::open(&dir).unwrap())
    };
    let pretty = hash_with(serde_json::to_string_pretty(&config).unwrap());
    assert_eq!(hash_with(config.to_string()), pretty, "formatting alone changes nothing");
    for (key, value) in [("hidden_act", serde_json::json!("gelu")), ("rms_norm_eps", serde_json::json!(0.5))] {
        let mut edited = config.clone();
        edited[key] = value;
        assert_ne!(hash_with(edited.to_string()), pretty, "{key}");
    }
}

/// An expert row the cache cannot hold is refused as it is appended, so a run never finishes
/// (and renames into place) a cache that reading it back refuses: logits beyond f16, and NaN
/// outputs, were committed first and found corrupt after (fuzzing round 3).
#[test]
fn rows_the_cache_cannot_hold_are_refused_before_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.cache");
    let (p, l) = rows(2, 7);
    let kind = LabelKind::Classification { classes: C };
    let mut huge = l.clone();
    huge[C + 1] = 1.5e5;
    let mut nan = p.clone();
    nan[2] = f32::NAN;
    for (probs, logits, want) in [(&p, &huge, "logit 1.5e5 is beyond the cache's f16 range"), (&nan, &l, "NaN")] {
        let mut w = CacheWriter::create(&path, provenance("wn-verb"), kind, 2, vec![]).unwrap();
        let err = w.append_classification(probs, logits).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("labels.cache"), "{err}");
        drop(w);
        assert!(!path.exists());
    }
    // Top-k records likewise: a remaining mass that is not a probability.
    let err = symerge::labels::cache::encode_topk(&[1, 2], &[0.5, 0.25], &[f32::NAN], 2).unwrap_err();
    assert!(err.contains("position 0") && err.contains("NaN"), "{err}");
}

/// Fuzzing round 4: a cache resumed with another `--batch-size` differed from a fresh one by f16
/// ulps (padding to a batch's longest input moves the sums). The partial file records the batch
/// size it was started with and a resumed run keeps it, so the finished cache is byte-identical
/// to an uninterrupted run at that size.
#[test]
fn a_resumed_cache_keeps_the_batch_size_it_was_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let expert = common::adapt_fixture::make_expert(&dir.path().join("expert"), 1, 3);
    // Texts of 1 to 29 words, so batches of five pad most of them.
    let words = "the cat sat on a mat river stream water flows down to sea fast foot time honest quality";
    let words: Vec<&str> = words.split(' ').collect();
    let texts: Vec<String> = (0..200)
        .map(|i| (0..1 + i % 29).map(|j| words[(i * 7 + j * 3) % words.len()]).collect::<Vec<_>>().join(" "))
        .collect();
    let texts = &texts[..];
    let opts = |name: &str, batch_size: usize| CacheLabelsOptions {
        batch_size,
        max_len: 32,
        ..CacheLabelsOptions::new(&expert, "t", dir.path().join(name))
    };
    let (whole, other) = (opts("whole.cache", 1), opts("other.cache", 5));
    cache_labels(Cpu, texts, &whole).unwrap();
    cache_labels(Cpu, texts, &other).unwrap();
    let rows = |path: &std::path::Path| std::fs::read(path).unwrap()[4096..].to_vec();
    assert_ne!(
        rows(&whole.output),
        rows(&other.output),
        "batch sizes 1 and 5 give other rows (else this test is void)"
    );

    // A run at batch size 1 killed after five rows.
    let reference = LabelCache::open(&whole.output, None).unwrap();
    let resumed = opts("resumed.cache", 5);
    let prov = expert_provenance(&expert, "t", 32, texts).unwrap();
    let labels: Vec<String> = (0..3).map(|c| format!("class-{c}")).collect();
    {
        let kind = LabelKind::Classification { classes: 3 };
        let mut w = CacheWriter::create(&resumed.output, prov, kind, texts.len(), labels).unwrap();
        assert_eq!(w.batch_size(1).unwrap(), 1);
        for i in 0..5 {
            w.append_classification(&reference.probs(i), &reference.logits(i)).unwrap();
        }
        w.flush().unwrap();
    }
    let s = cache_labels(Cpu, texts, &resumed).unwrap();
    assert_eq!(s.resumed_rows, 5);
    assert_eq!(std::fs::read(&resumed.output).unwrap(), std::fs::read(&whole.output).unwrap());
}
