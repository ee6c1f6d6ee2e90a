//! Hostile input (issue 14): thousands of mutated safetensors files, sharded checkpoints and label
//! caches (tests/mutate/), made from a fixed seed and read in-process by the library's public
//! readers, every tensor and row included. Each case must end either in an accepted file that the
//! reference `safetensors` crate (or, for label caches, the format's invariants) agrees with, or in
//! an error naming the file; a panic, or a case that runs past its deadline, fails the test. A
//! smaller sample goes through the CLI (`inspect`, `merge`), which must exit with a clean error,
//! never a panic or a signal.
//!
//! A failure prints the seed and the mutations; `SYMERGE_FUZZ_SEED=<seed> SYMERGE_FUZZ_CASES=1
//! cargo test --release --test robustness <test name>` reproduces it (case `i` of a run uses seed
//! `SYMERGE_FUZZ_SEED + i`). `SYMERGE_FUZZ_VERBOSE=1` prints every case before it runs, to find
//! one that kills the process.

mod common;
mod mutate;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safetensors::SafeTensors;
use symerge::Error;
use symerge::checkpoint::Checkpoint;
use symerge::labels::{LabelCache, LabelKind};

const DEFAULT_SEED: u64 = 0x5EED_0014;
/// A case taking longer than this is a hang (the slowest take milliseconds).
const CASE_DEADLINE: Duration = Duration::from_secs(10);
/// Each test stops starting cases after this many seconds (`SYMERGE_FUZZ_BUDGET_S`), so a slow
/// disk or a busy machine runs fewer cases instead of running for many minutes.
const BUDGET_S: u64 = 30;

/// `var` as a decimal or `0x` hexadecimal number, else `default`.
fn env_number(var: &str, default: u64) -> u64 {
    let Ok(text) = std::env::var(var) else { return default };
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|e| panic!("{var}={text}: {e}"))
}

/// The first seed and the number of cases (`SYMERGE_FUZZ_CASES` overrides `default_cases`).
fn plan(default_cases: u64) -> (u64, u64) {
    (env_number("SYMERGE_FUZZ_SEED", DEFAULT_SEED), env_number("SYMERGE_FUZZ_CASES", default_cases))
}

fn reproduce(test: &str, seed: u64) -> String {
    format!("SYMERGE_FUZZ_SEED={seed:#x} SYMERGE_FUZZ_CASES=1 cargo test --release --test robustness {test}")
}

/// What a run found.
#[derive(Default)]
struct Tally {
    accepted: u64,
    rejected: u64,
    failures: Vec<String>,
    /// Rejections by message, numbers and paths blanked (printed with SYMERGE_FUZZ_VERBOSE).
    reasons: std::collections::BTreeMap<String, u64>,
}

/// How a reader took a case: accepted, or rejected with this message.
enum Outcome {
    Accepted,
    Rejected(String),
}

/// A message with its paths and numbers blanked, so rejections group by kind.
fn reason_kind(message: &str, root: &Path) -> String {
    let text = message.replace(&root.display().to_string(), "<case>");
    let mut out = String::new();
    for c in text.chars().take(140) {
        if !(c.is_ascii_digit() && out.ends_with('#')) {
            out.push(if c.is_ascii_digit() { '#' } else { c });
        }
    }
    out
}

/// A directory for the cases: in memory when /dev/shm exists (the cache writer syncs each file,
/// which on a disk costs more than the reading under test).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let in_memory = shm.is_dir().then(|| tempfile::tempdir_in(shm).ok()).flatten();
    in_memory.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"))
}

/// The case being read: its seed, when it started, and its mutations.
type Current = Arc<Mutex<(u64, Instant, String)>>;

/// One kind of input under test: `prepare` writes case `seed` under a fresh directory (a panic
/// there is reported as the mutator's), `check` reads it with the library and says how it was
/// taken, or why that is wrong.
struct Target<C> {
    test: &'static str,
    prepare: fn(u64, &Path) -> (C, Vec<String>),
    check: fn(&C) -> Result<Outcome, String>,
}

impl<C: 'static> Target<C> {
    /// Runs the cases on a worker thread while this one watches each case's deadline.
    fn fuzz(self, default_cases: u64) -> Tally {
        let (first, cases) = plan(default_cases);
        let start = Instant::now();
        let current: Current = Arc::new(Mutex::new((first, Instant::now(), String::new())));
        let shared = current.clone();
        let test = self.test;
        let worker = std::thread::spawn(move || self.run(first, cases, start, &shared));
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
            let (seed, since, notes) = current.lock().expect("lock").clone();
            assert!(
                since.elapsed() < CASE_DEADLINE,
                "HANG: {test} case ran past {CASE_DEADLINE:?}\n  mutations: {notes}\n  {}",
                reproduce(test, seed)
            );
        }
        let tally = worker.join().expect("the worker catches panics");
        report(test, first, start, &tally);
        tally
    }

    /// Cases `first`, `first + 1`, ... until `cases` ran or the time budget is spent.
    fn run(&self, first: u64, cases: u64, start: Instant, current: &Current) -> Tally {
        let tmp = scratch();
        let mut tally = Tally::default();
        let budget = Duration::from_secs(env_number("SYMERGE_FUZZ_BUDGET_S", BUDGET_S));
        for seed in (0..cases).map(|i| first.wrapping_add(i)) {
            if start.elapsed() > budget {
                eprintln!("{}: stopped after {budget:?}, before case {seed:#x}", self.test);
                break;
            }
            let root = tmp.path().join(seed.to_string());
            std::fs::create_dir(&root).expect("case dir");
            self.case(seed, &root, current, &mut tally);
            let _ = std::fs::remove_dir_all(&root);
        }
        tally
    }

    /// Prepares and checks one case, adding its outcome to `tally`.
    fn case(&self, seed: u64, root: &Path, current: &Current, tally: &mut Tally) {
        let again = reproduce(self.test, seed);
        let Ok((case, notes)) = catch_unwind(AssertUnwindSafe(|| (self.prepare)(seed, root))) else {
            tally.failures.push(format!("the MUTATOR panicked (a test bug)\n  {again}"));
            return;
        };
        let notes = notes.join("; ");
        let verbose = std::env::var_os("SYMERGE_FUZZ_VERBOSE").is_some();
        if verbose {
            eprintln!("{} {seed:#x}: {notes}", self.test);
        }
        *current.lock().expect("lock") = (seed, Instant::now(), notes.clone());
        match catch_unwind(AssertUnwindSafe(|| (self.check)(&case))) {
            Ok(Ok(Outcome::Accepted)) => tally.accepted += 1,
            Ok(Ok(Outcome::Rejected(message))) => {
                if verbose {
                    eprintln!("  -> {message}");
                }
                tally.rejected += 1;
                *tally.reasons.entry(reason_kind(&message, root)).or_default() += 1;
            }
            Ok(Err(why)) => tally.failures.push(format!("{why}\n  mutations: {notes}\n  {again}")),
            Err(panic) => {
                tally.failures.push(format!("PANIC: {}\n  mutations: {notes}\n  {again}", panic_text(&panic)))
            }
        }
    }
}

/// The run's counts (and, with SYMERGE_FUZZ_VERBOSE, its rejections by kind) on stderr.
fn report(test: &str, first: u64, start: Instant, tally: &Tally) {
    if std::env::var_os("SYMERGE_FUZZ_VERBOSE").is_some() {
        tally.reasons.iter().for_each(|(r, n)| eprintln!("{n:6}  {r}"));
    }
    eprintln!(
        "{test}: {} cases from seed {first:#x} in {:.1} s: {} accepted, {} rejected, {} failures",
        tally.accepted + tally.rejected + tally.failures.len() as u64,
        start.elapsed().as_secs_f64(),
        tally.accepted,
        tally.rejected,
        tally.failures.len()
    );
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic.downcast_ref::<&str>().map(|s| s.to_string());
    text.or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default()
}

/// Fails listing the first failures, and unless both outcomes happened often enough for the run
/// to have tested anything (a smaller `SYMERGE_FUZZ_CASES` run only asks for no failures).
fn assert_clean(tally: &Tally, min_each: u64) {
    let shown: Vec<&str> = tally.failures.iter().take(10).map(String::as_str).collect();
    assert!(tally.failures.is_empty(), "{} failing cases; the first:\n{}", tally.failures.len(), shown.join("\n"));
    let min_each = if std::env::var_os("SYMERGE_FUZZ_CASES").is_some() { 0 } else { min_each };
    assert!(
        tally.accepted >= min_each && tally.rejected >= min_each,
        "too few cases of one outcome to have tested both: {} accepted, {} rejected",
        tally.accepted,
        tally.rejected
    );
}

/// A rejection must name the file (or the directory) it is about.
fn names(e: &Error, path: &Path) -> Result<Outcome, String> {
    let text = e.to_string();
    if text.contains(&path.display().to_string()) {
        Ok(Outcome::Rejected(text))
    } else {
        Err(format!("the error does not name {}: {text}", path.display()))
    }
}

/// A tensor as compared with the reference: its shard's file name, name, dtype, shape, bytes.
type Seen = (String, String, String, Vec<usize>, Vec<u8>);

/// Every tensor of an opened checkpoint; float tensors are also decoded to f32 and other dtypes
/// must be refused as floats, naming the file.
fn read_tensors(ckpt: &Checkpoint) -> Result<Vec<Seen>, String> {
    let mut seen = Vec::new();
    for t in &ckpt.tensors {
        let file = ckpt.file_of(t);
        match (t.float_dtype(), ckpt.stored(t)) {
            (Some(_), Ok(view)) => {
                let mut out = vec![0f32; view.numel()];
                view.decode_into(0, &mut out);
            }
            (None, Err(e)) => {
                names(&e, file)?;
            }
            (dtype, result) => return Err(format!("`{}` as {dtype:?} read as {:?}", t.name, result.map(|_| ()))),
        }
        let shard = file.file_name().map_or(String::new(), |f| f.to_string_lossy().into_owned());
        seen.push((shard, t.name.clone(), format!("{:?}", t.dtype), t.shape.clone(), ckpt.bytes(t).to_vec()));
    }
    seen.sort();
    Ok(seen)
}

/// The tensors of one file as the reference crate reads them (`shard` names the file).
fn reference_tensors(bytes: &[u8], shard: &str) -> Result<Vec<Seen>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("the safetensors crate rejects {shard}: {e}"))?;
    let mut seen: Vec<Seen> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (shard.to_string(), name, format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    seen.sort();
    Ok(seen)
}

// ---- single safetensors files ----

fn prepare_file(seed: u64, root: &Path) -> ((PathBuf, Vec<u8>), Vec<String>) {
    let case = mutate::safetensors::case(seed);
    let path = root.join("model.safetensors");
    std::fs::write(&path, &case.bytes).expect("write case");
    ((path, case.bytes), case.notes)
}

/// Our reader (open, read every tensor, inspect) against the reference crate.
fn check_file((path, bytes): &(PathBuf, Vec<u8>)) -> Result<Outcome, String> {
    let inspected = symerge::inspect::inspect(path).map(|_| ());
    let ckpt = match Checkpoint::open(path) {
        Ok(c) => c,
        Err(e) if inspected.is_ok() => return Err(format!("inspect accepts what Checkpoint::open rejects: {e}")),
        Err(e) => return names_tensor(&e, path, bytes),
    };
    inspected.map_err(|e| format!("inspect rejects what Checkpoint::open accepts: {e}"))?;
    let ours = read_tensors(&ckpt)?;
    let reference = reference_tensors(bytes, "model.safetensors").map_err(|e| format!("we accept, but {e}"))?;
    if ours != reference {
        return Err(format!("we read {} tensors, the reference {}; they differ", ours.len(), reference.len()));
    }
    Ok(Outcome::Accepted)
}

/// A header whose tensor's shape, dtype or offsets are wrong must name that tensor (the
/// reference crate's message for it names none).
fn names_tensor(e: &Error, path: &Path, bytes: &[u8]) -> Result<Outcome, String> {
    use safetensors::SafeTensorError as E;
    let outcome = names(e, path)?;
    // Which of these the crate reports depends on its hash map's order when several tensors lie.
    let about_a_tensor = matches!(
        SafeTensors::deserialize(bytes),
        Err(E::TensorInvalidInfo | E::InvalidOffset(_) | E::ValidationOverflow | E::MisalignedSlice)
    );
    if about_a_tensor && !e.to_string().contains("tensor `") {
        return Err(format!("the error names no tensor: {e}"));
    }
    Ok(outcome)
}

#[test]
fn safetensors_reader_survives_mutated_files() {
    let target = Target { test: "safetensors_reader_survives_mutated_files", prepare: prepare_file, check: check_file };
    let tally = target.fuzz(150_000);
    assert_clean(&tally, 2000);
}

// ---- sharded checkpoints ----

fn prepare_sharded(seed: u64, root: &Path) -> ((mutate::index::Case, PathBuf), Vec<String>) {
    let case = mutate::index::write_case(seed, root);
    let notes = case.notes.clone();
    ((case, root.to_path_buf()), notes)
}

/// The index's weight_map as (tensor, shard) pairs, if it is a non-empty object of strings.
fn weight_map(dir: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read(dir.join(mutate::index::INDEX)).map_err(|e| format!("index unreadable: {e}"))?;
    let index: serde_json::Value = serde_json::from_slice(&text).map_err(|e| format!("index no JSON: {e}"))?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or("no weight_map object")?;
    if map.is_empty() {
        return Err("the index lists no tensors".into());
    }
    let shard = |f: &serde_json::Value| f.as_str().map(String::from).ok_or("a shard name is no string");
    map.iter().map(|(t, f)| Ok((t.clone(), shard(f)?))).collect()
}

/// What a correct reader must find for an index it accepts: each shard it names a regular file
/// the reference crate accepts, each listed tensor in the shard the index names, no tensor in
/// two shards.
fn reference_sharded(dir: &Path) -> Result<Vec<Seen>, String> {
    let map = weight_map(dir)?;
    let mut files: Vec<&str> = map.iter().map(|(_, f)| f.as_str()).collect();
    files.sort();
    files.dedup();
    let mut all = Vec::new();
    for f in files {
        all.extend(reference_shard(dir, f)?);
    }
    all.sort();
    if let Some((t, f)) = map.iter().find(|(t, f)| !all.iter().any(|s| s.0 == *f && s.1 == *t)) {
        return Err(format!("tensor `{t}` is not in {f}"));
    }
    let names: std::collections::HashSet<&String> = all.iter().map(|s| &s.1).collect();
    if names.len() < all.len() {
        return Err("a tensor is stored in two shards".into());
    }
    Ok(all)
}

/// A shard the index names: a plain file name (nothing leading out of `dir`) of a regular file
/// there, read by the reference crate.
fn reference_shard(dir: &Path, name: &str) -> Result<Vec<Seen>, String> {
    let plain = Path::new(name).components().count() == 1 && Path::new(name).file_name().is_some_and(|n| n == name);
    let meta = std::fs::metadata(dir.join(name)).map_err(|e| format!("shard {name:?}: {e}"))?;
    if !plain || !meta.is_file() {
        return Err(format!("shard {name:?} is no plain file name of a regular file"));
    }
    let bytes = std::fs::read(dir.join(name)).map_err(|e| format!("shard {name}: {e}"))?;
    reference_tensors(&bytes, name)
}

fn check_sharded((case, root): &(mutate::index::Case, PathBuf)) -> Result<Outcome, String> {
    let target = if case.open_index { case.dir.join(mutate::index::INDEX) } else { case.dir.clone() };
    let ckpt = match Checkpoint::open(&target) {
        Ok(c) => c,
        // `../` names lead out of the checkpoint directory, but not out of the case's root.
        Err(e) => return names(&e, root),
    };
    let ours = read_tensors(&ckpt)?;
    let reference = reference_sharded(&case.dir).map_err(|e| format!("we accept, but {e}"))?;
    if ours != reference {
        return Err(format!("we read {} tensors, the reference {}; they differ", ours.len(), reference.len()));
    }
    Ok(Outcome::Accepted)
}

#[test]
fn shard_index_reader_survives_mutated_checkpoints() {
    let target = Target {
        test: "shard_index_reader_survives_mutated_checkpoints",
        prepare: prepare_sharded,
        check: check_sharded,
    };
    let tally = target.fuzz(8_000);
    assert_clean(&tally, 200);
}

// ---- label caches ----

fn prepare_cache(seed: u64, root: &Path) -> ((PathBuf, bool), Vec<String>) {
    let case = mutate::cache::write_case(seed, root);
    ((case.path, seed.is_multiple_of(2)), case.notes)
}

/// Opens a cache (with the provenance it was made for, or none) and reads every row.
fn check_cache((path, with_provenance): &(PathBuf, bool)) -> Result<Outcome, String> {
    let want = mutate::cache::provenance();
    let cache = match LabelCache::open(path, with_provenance.then_some(&want)) {
        Ok(c) => c,
        Err(e) => return names(&e, path),
    };
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len() as u128;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let hash = blake3::hash(&bytes[mutate::cache::HEADER_BYTES..]).to_hex().to_string();
    if !cache.header.complete || cache.header.data_hash.as_deref() != Some(hash.as_str()) {
        return Err("accepted an incomplete cache or one whose checksum differs".into());
    }
    let rows = cache.rows() as u128;
    let data = match cache.kind() {
        LabelKind::Classification { classes } => check_rows(&cache, classes)?,
        LabelKind::TopK { k, vocab } => check_topk(&cache, k, vocab)?,
    };
    if len != mutate::cache::HEADER_BYTES as u128 + data {
        return Err(format!("accepted {len} bytes for {rows} rows holding {data} bytes of data"));
    }
    Ok(Outcome::Accepted)
}

/// Every classification row read back: `classes` probabilities forming a distribution and as
/// many finite logits. Returns the data's size.
fn check_rows(cache: &LabelCache, classes: usize) -> Result<u128, String> {
    if classes == 0 {
        return Err("accepted a cache of zero classes".into());
    }
    for i in 0..cache.rows() {
        let (p, l) = (cache.probs(i), cache.logits(i));
        let sum: f32 = p.iter().sum();
        let fine = p.len() == classes && l.len() == classes && p.iter().all(|v| (0.0..=1.01).contains(v));
        if !fine || (sum - 1.0).abs() > 0.02 || l.iter().any(|v| !v.is_finite()) {
            return Err(format!("row {i} is no distribution: {p:?} {l:?}"));
        }
    }
    let all: Vec<usize> = (0..cache.rows()).collect();
    if cache.probs_batch(&all).len() != cache.rows() * classes {
        return Err("probs_batch of every row has the wrong length".into());
    }
    Ok(cache.rows() as u128 * classes as u128 * 4)
}

/// Every input's top-k records read back: ids inside the vocabulary, distributions, positions
/// adding up to the header's. Returns the data's size.
fn check_topk(cache: &LabelCache, k: usize, vocab: usize) -> Result<u128, String> {
    if k == 0 || k > vocab {
        return Err(format!("accepted top-{k} over {vocab} tokens"));
    }
    let mut positions = 0;
    for i in 0..cache.rows() {
        let l = cache.topk(i).map_err(|e| format!("input {i}: {e}"))?;
        if l.positions() != cache.positions(i) || l.ids.len() != k * l.positions() {
            return Err(format!("input {i}: {} positions, {} ids", l.positions(), l.ids.len()));
        }
        let bad_id = l.ids.iter().any(|&id| id as usize >= vocab);
        let sums = l.probs.chunks(k).zip(&l.rest).map(|(p, r)| p.iter().sum::<f32>() + r);
        if bad_id || sums.clone().any(|s| (s - 1.0).abs() > 2e-3) {
            return Err(format!("input {i}: ids or probabilities are no distribution: {l:?}"));
        }
        positions += l.positions();
    }
    if Some(positions) != cache.header.positions || cache.topk(cache.rows()).is_ok() {
        return Err(format!("{positions} positions read, header says {:?}", cache.header.positions));
    }
    Ok((cache.rows() as u128 + 1) * 8 + positions as u128 * (8 * k as u128 + 4))
}

#[test]
fn label_cache_reader_survives_mutated_caches() {
    let target =
        Target { test: "label_cache_reader_survives_mutated_caches", prepare: prepare_cache, check: check_cache };
    let tally = target.fuzz(120_000);
    assert_clean(&tally, 1000);
}

// ---- the CLI ----

/// Runs the CLI for at most half of `CASE_DEADLINE`; its exit status and stderr.
fn run_bounded(args: &[&str]) -> Result<(ExitStatus, String), String> {
    let mut child = common::symerge()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut err = String::new();
    let reader = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut text);
            text
        })
    });
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            if let Some(r) = reader {
                err = r.join().unwrap_or_default();
            }
            return Ok((status, err));
        }
        if start.elapsed() > CASE_DEADLINE / 2 {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("symerge {args:?} hung for {:?}", CASE_DEADLINE / 2));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A clean outcome: success, or exit code 1 (an error) or 2 (usage) with a message naming one of
/// `paths`; no panic, no signal.
fn clean_exit(status: ExitStatus, err: &str, paths: &[&Path]) -> Result<Outcome, String> {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        return Err(format!("killed by signal {sig}: {err}"));
    }
    match status.code() {
        Some(0) => Ok(Outcome::Accepted),
        Some(1 | 2) if err.contains("panicked") => Err(format!("a panic reported as an error: {err}")),
        Some(1 | 2) if paths.iter().any(|p| err.contains(&p.display().to_string())) => {
            Ok(Outcome::Rejected(err.to_string()))
        }
        Some(1 | 2) => Err(format!("the error names none of {paths:?}: {err}")),
        other => Err(format!("exit status {other:?} (101 is a panic): {err}")),
    }
}

fn write_model_dir(dir: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("model dir");
    std::fs::write(dir.join("model.safetensors"), bytes).expect("weights");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "test"}"#).expect("config");
}

/// A CLI case: `base` holds the valid file, `expert` the mutated one, both under `root`.
struct Models {
    root: PathBuf,
    base: PathBuf,
    expert: PathBuf,
}

fn prepare_models(seed: u64, root: &Path) -> (Models, Vec<String>) {
    let case = mutate::safetensors::case(seed);
    let (base, expert) = (root.join("base"), root.join("expert"));
    write_model_dir(&base, &case.valid.bytes());
    write_model_dir(&expert, &case.bytes);
    (Models { root: root.to_path_buf(), base, expert }, case.notes)
}

/// `symerge inspect` on the mutated model, agreeing with the library.
fn check_inspect(m: &Models) -> Result<Outcome, String> {
    let (status, err) = run_bounded(&["inspect", m.expert.to_str().expect("UTF-8 path")])?;
    let outcome = clean_exit(status, &err, &[&m.expert])?;
    if matches!(outcome, Outcome::Accepted) != symerge::inspect::inspect(&m.expert).is_ok() {
        return Err(format!("the CLI and the library disagree on inspect: {err}"));
    }
    Ok(outcome)
}

/// `symerge merge` of the valid model (base) with the mutated one (expert): the output exists
/// exactly when it succeeds.
fn check_merge(m: &Models) -> Result<Outcome, String> {
    let (cfg, out) = (m.root.join("merge.yml"), m.root.join("out"));
    let models = [m.base.clone(), m.expert.clone()];
    common::write_merge_config(&cfg, &models, &["1.0"], "merge_method: task_arithmetic\n");
    let (c, o) = (cfg.to_str().expect("UTF-8 path"), out.to_str().expect("UTF-8 path"));
    let (status, err) = run_bounded(&["--threads", "1", "merge", c, "-o", o, "--device", "cpu", "-q"])?;
    let outcome = clean_exit(status, &err, &[&m.expert, &m.base])?;
    if matches!(outcome, Outcome::Accepted) != out.exists() {
        return Err(format!("merge exit status {status} but the output exists: {}", out.exists()));
    }
    Ok(outcome)
}

#[test]
fn cli_inspect_exits_cleanly_on_mutated_checkpoints() {
    let test = "cli_inspect_exits_cleanly_on_mutated_checkpoints";
    let tally = Target { test, prepare: prepare_models, check: check_inspect }.fuzz(600);
    assert_clean(&tally, 20);
}

#[test]
fn cli_merge_exits_cleanly_on_mutated_checkpoints() {
    let test = "cli_merge_exits_cleanly_on_mutated_checkpoints";
    let tally = Target { test, prepare: prepare_models, check: check_merge }.fuzz(600);
    assert_clean(&tally, 20);
}
