//! `symerge data prepare` on the real Debian packages (run `scripts/fetch-assets.sh` first).
//! Counts are checked against the source files parsed here with separate, simple code, not
//! against numbers copied from a previous run.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use symerge::data::jsonl::read_jsonl;
use symerge::data::{PrepareOptions, Task, TaskSummary, prepare};

const MAX_CHARS: usize = 512;

fn opts(out: &Path, max_per_class: Option<usize>) -> PrepareOptions {
    PrepareOptions { source: common::debian_dir(), out: out.to_path_buf(), max_chars: MAX_CHARS, max_per_class }
}

/// The same whitespace rule as the library, written independently.
fn norm(s: &str) -> String {
    let visible: String = s.chars().filter(|c| c.is_whitespace() || !c.is_control()).collect();
    visible.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// (text, label, label_id) rows of one split file, each line parsed as plain JSON.
fn rows(dir: &Path, split: &str) -> Vec<(String, String, usize)> {
    let path = dir.join(format!("{split}.jsonl"));
    let content = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    content
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let obj = v.as_object().unwrap();
            assert_eq!(obj.len(), 3, "{l}");
            (
                obj["text"].as_str().unwrap().to_string(),
                obj["label"].as_str().unwrap().to_string(),
                obj["label_id"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn labels_json(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("labels.json")).unwrap()).unwrap()
}

/// Checks a task folder for internal consistency: labels.json counts equal the rows in the JSONL
/// files, label ids agree with the label list, and no text is in two splits (or twice in one).
/// Returns rows per label over all splits.
fn check_consistent(dir: &Path) -> BTreeMap<String, usize> {
    let meta = labels_json(dir);
    let labels: Vec<String> = meta["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().into()).collect();
    let mut seen = HashSet::new();
    let mut totals = BTreeMap::new();
    for split in ["train", "validation", "test"] {
        let mut per_label: BTreeMap<String, u64> = BTreeMap::new();
        for (text, label, id) in rows(dir, split) {
            assert_eq!(labels[id], label, "{}: label id {id}", dir.display());
            assert!(!text.is_empty() && text == norm(&text), "not normalised: {text:?}");
            assert!(text.chars().count() <= MAX_CHARS);
            assert!(seen.insert(text.clone()), "{}: text in two places: {text:?}", dir.display());
            *per_label.entry(label.clone()).or_default() += 1;
            *totals.entry(label).or_default() += 1;
        }
        let counts = meta["counts"][split].as_object().unwrap();
        assert_eq!(counts.len(), labels.len(), "{split}: every label listed");
        for (label, n) in counts {
            assert_eq!(n.as_u64().unwrap(), per_label.get(label).copied().unwrap_or(0), "{split}/{label}");
        }
    }
    totals
}

/// Independent parse of a WordNet data file: lex file number -> count of glosses that appear
/// under exactly one lex file (duplicates counted once).
fn wordnet_counts(file: &str) -> BTreeMap<usize, usize> {
    let path = common::debian_dir().join("usr/share/wordnet").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lexfiles: HashMap<String, HashSet<usize>> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with("  ")) {
        let lexfile: usize = line.split(' ').nth(1).unwrap().parse().unwrap();
        let gloss = norm(line.split_once(" | ").unwrap().1);
        assert!(gloss.chars().count() <= MAX_CHARS, "a WordNet gloss over {MAX_CHARS} chars: adapt this test");
        lexfiles.entry(gloss).or_default().insert(lexfile);
    }
    let mut out = BTreeMap::new();
    for set in lexfiles.values().filter(|s| s.len() == 1) {
        *out.entry(*set.iter().next().unwrap()).or_default() += 1;
    }
    out
}

fn check_wordnet(task: Task, file: &str, first_lexfile: usize, classes: usize) -> TaskSummary {
    let out = tempfile::tempdir().unwrap();
    let summary = prepare(task, &opts(out.path(), None)).unwrap();
    let totals = check_consistent(&out.path().join(task.name()));
    let expected = wordnet_counts(file);
    assert_eq!(summary.labels.len(), classes);
    assert_eq!(expected.len(), classes);
    for (lexfile, n) in &expected {
        let label = &summary.labels[lexfile - first_lexfile];
        assert_eq!(totals[label], *n, "{label} (lex file {lexfile})");
    }
    let total: usize = totals.values().sum();
    assert_eq!(total, expected.values().sum::<usize>());
    summary
}

#[test]
fn wn_noun_counts_match_an_independent_parse() {
    let s = check_wordnet(Task::WnNoun, "data.noun", 3, 26);
    assert_eq!((s.labels[0].as_str(), s.labels[25].as_str()), ("noun.Tops", "noun.time"));
    assert!(s.labels.iter().all(|l| l.starts_with("noun.")));
    let total: usize = s.rows.values().sum();
    assert!(total > 80_000, "{total}");
    assert_eq!(s.stats.read, 82_115);
    assert_eq!(s.stats.read, total + s.stats.duplicates + s.stats.conflicting + s.stats.empty);

    // 80/10/10 within 2 points.
    for (split, want) in [("train", 0.8), ("validation", 0.1), ("test", 0.1)] {
        let n = s.rows.iter().find(|(k, _)| k.to_string() == split).unwrap().1;
        let frac = *n as f64 / total as f64;
        assert!((frac - want).abs() < 0.02, "{split}: {frac:.4}");
    }
}

#[test]
fn wn_verb_counts_match_an_independent_parse() {
    let s = check_wordnet(Task::WnVerb, "data.verb", 29, 15);
    assert_eq!((s.labels[0].as_str(), s.labels[14].as_str()), ("verb.body", "verb.weather"));
    assert_eq!(s.stats.read, 13_767);
}

/// Independent parse of fortune files: normalised entries of each plain file in `dir`.
fn fortune_entries(dir: &Path) -> HashMap<String, HashSet<String>> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if path.is_symlink() || !path.is_file() || name.ends_with(".dat") || name.ends_with(".u8") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8(bytes).unwrap_or_else(|e| e.into_bytes().iter().map(|&b| b as char).collect());
        let lines: Vec<&str> = text.lines().collect();
        let entries = lines.split(|l| l.trim_end() == "%").map(|entry| norm(&entry.join("\n"))).collect();
        out.insert(name, entries);
    }
    out
}

/// Whether `text` is one of `entries`, or the start of a longer one cut to MAX_CHARS.
fn is_entry(text: &str, entries: &HashSet<String>) -> bool {
    entries.contains(text) || entries.iter().any(|e| e.starts_with(text) && e.chars().count() > MAX_CHARS)
}

#[test]
fn fortune_topic_has_large_real_categories() {
    let out = tempfile::tempdir().unwrap();
    let s = prepare(Task::FortuneTopic, &opts(out.path(), None)).unwrap();
    let dir = out.path().join("fortune-topic");
    let totals = check_consistent(&dir);
    assert!(s.labels.len() >= 8, "{:?}", s.labels);
    for label in &s.labels {
        assert!(totals[label] >= 250, "{label}: {}", totals[label]);
    }
    assert!(!s.labels.iter().any(|l| l == "cookie" || l == "miscellaneous"));
    let mut sorted = s.labels.clone();
    sorted.sort();
    assert_eq!(sorted, s.labels, "labels are in name order");

    // Every row is an entry of the category file it is labelled with.
    let english = fortune_entries(&common::debian_dir().join("usr/share/games/fortunes"));
    for split in ["train", "validation", "test"] {
        for (text, label, _) in rows(&dir, split) {
            assert!(is_entry(&text, &english[&label]), "not in {label}: {text:?}");
        }
    }
}

#[test]
fn lang_id_has_six_languages_capped_by_hash() {
    let out = tempfile::tempdir().unwrap();
    let s = prepare(Task::LangId, &opts(out.path(), None)).unwrap();
    let dir = out.path().join("lang-id");
    let totals = check_consistent(&dir);
    assert!(s.labels.len() >= 6, "{:?}", s.labels);
    for code in ["en", "de", "it", "pl", "cs", "eo"] {
        let n = totals.get(code).copied().unwrap_or(0);
        assert!((1000..=3000).contains(&n), "{code}: {n}");
    }

    // Each row comes from a file of its language.
    let games = common::debian_dir().join("usr/share/games");
    let mut by_lang: HashMap<&str, HashSet<String>> = HashMap::new();
    for (code, sub) in [("en", ""), ("de", "de"), ("it", "it"), ("pl", "pl"), ("cs", "cs"), ("eo", "eo")] {
        by_lang.insert(code, fortune_entries(&games.join("fortunes").join(sub)).into_values().flatten().collect());
    }
    let mut all_rows = Vec::new();
    for split in ["train", "validation", "test"] {
        all_rows.extend(rows(&dir, split));
    }
    for (text, label, _) in &all_rows {
        assert!(is_entry(text, &by_lang[label.as_str()]), "not {label}: {text:?}");
    }

    // A smaller cap keeps a subset of the same texts (the cap order is a fixed hash order).
    let small = tempfile::tempdir().unwrap();
    let s1000 = prepare(Task::LangId, &opts(small.path(), Some(1000))).unwrap();
    let kept = check_consistent(&small.path().join("lang-id"));
    assert!(kept.values().all(|&n| n == 1000), "{kept:?}");
    assert_eq!(s1000.max_per_class, Some(1000));
    let big: HashSet<String> = all_rows.into_iter().map(|r| r.0).collect();
    for split in ["train", "validation", "test"] {
        for (text, ..) in rows(&small.path().join("lang-id"), split) {
            assert!(big.contains(&text), "capped run kept a text the 3000 cap dropped: {text:?}");
        }
    }
}

#[test]
fn lm_tasks_hold_one_language_each_capped_and_split() {
    assert_eq!(Task::parse_list("lm").unwrap(), Task::LANGUAGE_MODELLING.to_vec());
    assert_eq!(Task::parse_list("all,lm-de").unwrap().len(), 5);
    let e = Task::parse_list("lm-xx").unwrap_err();
    assert!(e.contains("unknown task `lm-xx`") && e.contains("lm-gloss"), "{e}");

    let out = tempfile::tempdir().unwrap();
    let games = common::debian_dir().join("usr/share/games/fortunes");
    for (code, task) in [("de", "lm-de"), ("eo", "lm-eo")] {
        let t: Task = task.parse().unwrap();
        assert!(t.is_lm());
        let s = prepare(t, &opts(out.path(), None)).unwrap();
        assert_eq!(s.labels, vec![code.to_string()]);
        let totals = check_consistent(&out.path().join(task));
        let n = totals[code];
        assert!((1000..=3000).contains(&n), "{task}: {n}");
        let entries: HashSet<String> = fortune_entries(&games.join(code)).into_values().flatten().collect();
        for split in ["train", "validation", "test"] {
            let rows = rows(&out.path().join(task), split);
            assert!(!rows.is_empty(), "{task} {split}");
            for (text, label, id) in rows {
                assert!(label == code && id == 0 && is_entry(&text, &entries), "{task}: {text:?}");
            }
        }
    }

    // Glosses: every row is a noun or verb gloss, capped at the default LM size.
    let s = prepare(Task::LmGloss, &opts(out.path(), None)).unwrap();
    assert_eq!(s.labels, vec!["en".to_string()]);
    assert_eq!(check_consistent(&out.path().join("lm-gloss"))["en"], symerge::data::LM_MAX_TEXTS);
    let wn = common::debian_dir().join("usr/share/wordnet");
    let mut glosses = HashSet::new();
    for file in ["data.noun", "data.verb"] {
        for line in std::fs::read_to_string(wn.join(file)).unwrap().lines().filter(|l| !l.starts_with("  ")) {
            if let Some((_, g)) = line.split_once(" | ") {
                glosses.insert(norm(g));
            }
        }
    }
    for (text, ..) in rows(&out.path().join("lm-gloss"), "test") {
        assert!(is_entry(&text, &glosses), "not a gloss: {text:?}");
    }
}

/// All files under `dir`, relative path -> bytes, except each task's `.symerge-output` marker
/// (checked present): it records the command line, which differs between processes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir(dir).unwrap() {
        let task = task.unwrap().path();
        assert!(task.join(".symerge-output").is_file(), "{} has no marker", task.display());
        for f in std::fs::read_dir(&task).unwrap() {
            let f = f.unwrap().path();
            if f.file_name().is_some_and(|n| n == ".symerge-output") {
                continue;
            }
            out.insert(f.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&f).unwrap());
        }
    }
    out
}

#[test]
fn preparing_twice_gives_identical_files() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for t in Task::every() {
        prepare(t, &opts(a.path(), None)).unwrap();
    }
    // Reverse order, and over a previous output, for the second run.
    for t in Task::every().collect::<Vec<_>>().into_iter().rev() {
        prepare(t, &opts(b.path(), None)).unwrap();
        prepare(t, &opts(b.path(), None)).unwrap();
    }
    let (sa, sb) = (snapshot(a.path()), snapshot(b.path()));
    assert_eq!(sa.len(), 4 * Task::every().count(), "4 files per task, no temporary files left: {:?}", sa.keys());
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (path, bytes) in &sa {
        assert!(bytes == &sb[path], "{} differs between runs", path.display());
    }
}

#[test]
fn jsonl_reader_accepts_good_files_and_names_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        concat!(
            "{\"text\": \"a\", \"label\": \"x\", \"label_id\": 1}\n",
            "\n",
            "{\"text\": \"b\", \"label\": 4, \"source\": \"extra\"}\n",
            "{\"text\": \"c\"}\n",
        ),
    )
    .unwrap();
    let ex = read_jsonl(&good).unwrap();
    assert_eq!(ex.len(), 3);
    assert_eq!((ex[0].text.as_str(), ex[0].label.as_deref(), ex[0].label_id), ("a", Some("x"), Some(1)));
    assert_eq!((ex[1].label.as_deref(), ex[1].label_id), (None, Some(4)));
    assert_eq!((ex[2].label.as_deref(), ex[2].label_id), (None, None));

    for (name, content, line) in [
        ("notjson.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{text: c}\n", 3),
        ("notext.jsonl", "{\"text\": \"a\"}\n{\"label\": \"x\"}\n", 2),
        ("badtext.jsonl", "{\"text\": [\"a\"]}\n", 1),
        ("badlabel.jsonl", "\n{\"text\": \"a\", \"label\": 1.5}\n", 2),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let err = read_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("{}: line {line}:", path.display())), "{name}: {err}");
    }
    let missing = dir.path().join("missing.jsonl");
    assert!(read_jsonl(&missing).unwrap_err().to_string().contains("missing.jsonl"));

    // A prepared split reads back with the same rows.
    prepare(Task::WnVerb, &opts(dir.path(), None)).unwrap();
    let test = dir.path().join("wn-verb/test.jsonl");
    let read = read_jsonl(&test).unwrap();
    let plain = rows(&dir.path().join("wn-verb"), "test");
    assert_eq!(read.len(), plain.len());
    for (e, (text, label, id)) in read.iter().zip(&plain) {
        assert_eq!((&e.text, e.label.as_ref(), e.label_id), (text, Some(label), Some(*id)));
    }
}

#[test]
fn cli_prepares_a_task_and_reports_it() {
    let out = tempfile::tempdir().unwrap();
    let source = common::debian_dir();
    let (ok, stdout, stderr) = common::run(&[
        "data",
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--task",
        "fortune-topic",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let dir = out.path().join("fortune-topic");
    for f in ["train.jsonl", "validation.jsonl", "test.jsonl", "labels.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let totals = check_consistent(&dir);
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    // An object like every command's (fuzzing round 6: it was a bare array).
    let task = &summary["tasks"].as_array().unwrap()[0];
    assert_eq!(task["task"], "fortune-topic");
    assert_eq!(task["labels"], labels_json(&dir)["labels"]);
    for split in ["train", "validation", "test"] {
        let lines = std::fs::read_to_string(dir.join(format!("{split}.jsonl"))).unwrap().lines().count();
        assert_eq!(task["rows"][split].as_u64().unwrap() as usize, lines, "{split}");
    }
    assert_eq!(task["rows"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum::<u64>() as usize, {
        totals.values().sum::<usize>()
    });

    // Text summary names the classes; bad arguments fail with a useful message.
    let (ok, stdout, _) = common::run(&[
        "data",
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--task",
        "wn-verb",
    ]);
    assert!(ok);
    assert!(stdout.contains("wn-verb: 15 classes") && stdout.contains("verb.weather"), "{stdout}");
    let (ok, _, stderr) =
        common::run(&["data", "prepare", "--source", "/nonexistent", "--out", "x", "--task", "wn-noun"]);
    assert!(!ok && stderr.contains("fetch-assets.sh") && stderr.contains("wordnet-base"), "{stderr}");
    let (ok, _, stderr) = common::run(&["data", "prepare", "--out", "x", "--task", "sentiment"]);
    assert!(!ok && stderr.contains("unknown task `sentiment`"), "{stderr}");
    // An output inside the source tree it reads is refused before anything is read (fuzzing
    // round 6), as every command refuses an output inside an input.
    let own = out.path().join("own-source");
    std::fs::create_dir(&own).unwrap();
    let inside = own.join("data");
    let args = ["data", "prepare", "--source", own.to_str().unwrap(), "--out", inside.to_str().unwrap()];
    let (ok, _, stderr) = common::run(&[&args[..], &["--task", "wn-verb"]].concat());
    assert!(!ok && stderr.contains(&format!("lies inside the input {}", own.display())), "{stderr}");
    assert!(!inside.exists());
    // Texts cut to one character are nearly all repeats: said so, not "no examples found", and
    // a classification task left with one class (wn-verb: one text) is not written either
    // (fuzzing round 5).
    let tiny = out.path().join("tiny");
    let src = source.to_str().unwrap();
    for (task, want) in [("fortune-topic", "none of the "), ("wn-verb", "a classification task needs two classes")] {
        let args = ["data", "prepare", "--source", src, "--out", tiny.to_str().unwrap(), "--task", task];
        let (ok, _, stderr) = common::run(&[&args[..], &["--max-chars", "1"]].concat());
        assert!(!ok && stderr.contains(&format!("{task}: {want}")) && stderr.contains("--max-chars 1"), "{stderr}");
        assert!(stderr.contains(" repeats") && !stderr.contains("no examples found"), "{stderr}");
        assert!(!tiny.join(task).exists(), "{task}: a task with too few classes was written");
    }

    // A task folder symerge did not write is refused before any task is written.
    let fresh = tempfile::tempdir().unwrap();
    let mine = fresh.path().join("wn-verb");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("train.jsonl"), "my own data\n").unwrap();
    let args = ["data", "prepare", "--source", source.to_str().unwrap(), "--out", fresh.path().to_str().unwrap()];
    let (ok, _, stderr) = common::run(&[&args[..], &["--task", "fortune-topic,wn-verb"]].concat());
    assert!(
        !ok && stderr.contains(&format!("output {} is not empty and was not written by symerge", mine.display())),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(mine.join("train.jsonl")).unwrap(), "my own data\n");
    assert!(!fresh.path().join("fortune-topic").exists(), "a task was written before the refusal");
    let leftovers: Vec<_> = std::fs::read_dir(fresh.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["wn-verb"], "nothing else written");
}
