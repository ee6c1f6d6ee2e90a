//! Real labelled text tasks from Debian packages (WordNet 3.0 and fortune cookies), prepared as
//! deterministic train/validation/test JSONL files.
//!
//! Every task goes through the same steps: normalise whitespace, drop empty (and, for fortunes,
//! mostly non-letter) entries, cap the length, drop duplicate texts (a text seen under two labels
//! is dropped entirely: it cannot be classified), drop too-small classes, cap class sizes, and
//! split by a stable hash of the text ([`split`]). Each task's directory is written atomically
//! (built beside it, renamed into place), and the same sources always give byte-identical files.
//!
//! - [`wordnet`]: `wn-noun`, `wn-verb` (gloss -> supersense).
//! - [`fortune`]: `fortune-topic` (entry -> category), `lang-id` (entry -> language).
//! - Language-modelling tasks (texts for causal-LM fine-tuning and evaluation; one class, the
//!   language): `lm-de`, `lm-it`, `lm-pl`, `lm-eo` (that language's fortunes) and `lm-gloss`
//!   (English WordNet noun and verb glosses).
//! - [`jsonl`]: the JSONL format, reader and atomic writer.

pub mod fortune;
pub mod jsonl;
pub mod split;
pub mod text;
pub mod wordnet;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};
use jsonl::{Record, to_jsonl};

use crate::atomic::Staging;
use split::{Split, cap_order, stable_hash};
use wordnet::Pos;

/// Entries longer than this many characters are cut (`--max-chars`).
pub const DEFAULT_MAX_CHARS: usize = 512;

/// `lang-id`'s class cap when `--max-per-class` is not given, so that English (~14k entries) and
/// German (~18k) do not swamp Esperanto (~2.6k).
pub const LANG_ID_MAX_PER_CLASS: usize = 3000;

/// Texts kept per language-modelling task (deterministically chosen by [`cap_order`]) when
/// `--max-per-class` is not given: enough to fine-tune and evaluate a small LM on a CPU.
pub const LM_MAX_TEXTS: usize = 3000;

/// `fortune-topic` keeps the categories with at least this many entries after filtering and
/// deduplication; fewer leave too few validation and test rows to measure a class.
pub const TOPIC_MIN_ENTRIES: usize = 250;

/// Large English categories left out of `fortune-topic`: grab-bags without a topic.
///
/// With the `fortunes` 1.99.1 package (Debian bookworm) the chosen categories are the 16 with at
/// least 250 entries left: art, computers, definitions, disclaimer, knghtbrd, linux, men-women,
/// people, perl, platitudes, politics, science, songs-poems, wisdom, work, zippy. Left out as too
/// small: startrek (227), drugs (206), law (203), education (201) and smaller ones.
pub const TOPIC_EXCLUDED: &[&str] = &["cookie", "miscellaneous"];

/// A data-preparation task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    WnNoun,
    WnVerb,
    FortuneTopic,
    LangId,
    /// Fortunes of one language (its ISO 639-1 code in [`fortune::LANGUAGES`]), for an LM.
    LmFortunes(&'static str),
    /// English WordNet glosses (nouns and verbs), for an LM.
    LmGloss,
}

impl Task {
    /// The classification tasks (`all`).
    pub const CLASSIFICATION: [Task; 4] = [Task::WnNoun, Task::WnVerb, Task::FortuneTopic, Task::LangId];
    /// The language-modelling tasks (`lm`).
    pub const LANGUAGE_MODELLING: [Task; 5] =
        [Task::LmFortunes("de"), Task::LmFortunes("it"), Task::LmFortunes("pl"), Task::LmFortunes("eo"), Task::LmGloss];

    /// Every task, classification first.
    pub fn every() -> impl Iterator<Item = Task> {
        Task::CLASSIFICATION.into_iter().chain(Task::LANGUAGE_MODELLING)
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::WnNoun => "wn-noun",
            Task::WnVerb => "wn-verb",
            Task::FortuneTopic => "fortune-topic",
            Task::LangId => "lang-id",
            Task::LmFortunes("de") => "lm-de",
            Task::LmFortunes("it") => "lm-it",
            Task::LmFortunes("pl") => "lm-pl",
            Task::LmFortunes("eo") => "lm-eo",
            Task::LmFortunes(_) => "lm-fortunes",
            Task::LmGloss => "lm-gloss",
        }
    }

    /// Whether the task's texts are for a language model (one class) rather than a classifier.
    pub fn is_lm(self) -> bool {
        matches!(self, Task::LmFortunes(_) | Task::LmGloss)
    }

    /// Parses `all` (the classification tasks), `lm` (the language-modelling ones), one task
    /// name, or a comma-separated list of these.
    pub fn parse_list(s: &str) -> Result<Vec<Task>, String> {
        let mut out = Vec::new();
        for part in s.split(',') {
            let tasks: Vec<Task> = match part.trim() {
                "all" => Task::CLASSIFICATION.to_vec(),
                "lm" => Task::LANGUAGE_MODELLING.to_vec(),
                name => vec![name.parse()?],
            };
            for task in tasks {
                if !out.contains(&task) {
                    out.push(task);
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Task::every().find(|t| t.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Task::every().map(|t| t.name()).collect();
            format!("unknown task `{s}` (available: {}, all, lm)", names.join(", "))
        })
    }
}

/// Where to read, where to write, and the limits; also `symerge data prepare`'s flags (their
/// defaults are [`PrepareOptions::new`]'s).
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareOptions {
    /// Directory the packages were extracted into (`/` for a system install).
    #[arg(long, default_value = DEFAULT_SOURCE)]
    pub source: PathBuf,
    /// Output directory; each task gets OUT/<task>/{train,validation,test}.jsonl and labels.json
    /// (replacing only an earlier `data prepare` output there, or an empty directory).
    #[arg(short = 'o', long)]
    pub out: PathBuf,
    /// Cut longer entries to this many characters.
    #[arg(long, default_value_t = DEFAULT_MAX_CHARS)]
    pub max_chars: usize,
    /// Keep at most N texts per class (default: no cap, except 3000 for lang-id and 3000 texts per lm-* task).
    // The texts kept are chosen by hash (split::cap_order); `None` also caps each
    // language-modelling task at LM_MAX_TEXTS.
    #[arg(long, value_name = "N")]
    pub max_per_class: Option<usize>,
}

/// Where scripts/fetch-assets.sh unpacks the Debian packages.
pub const DEFAULT_SOURCE: &str = "target/assets/debian";

impl PrepareOptions {
    /// The defaults: sources where scripts/fetch-assets.sh puts them, entries cut at 512
    /// characters, no class cap beyond each task's own.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        PrepareOptions {
            source: DEFAULT_SOURCE.into(),
            out: out.into(),
            max_chars: DEFAULT_MAX_CHARS,
            max_per_class: None,
        }
    }

    /// Refuses limits that would leave nothing: zero characters, or zero texts per class.
    pub fn validate(&self) -> Result<()> {
        if self.max_chars == 0 {
            return Err(Error::Invalid("--max-chars must be at least 1".into()));
        }
        if self.max_per_class == Some(0) {
            return Err(Error::Invalid("--max-per-class must be at least 1".into()));
        }
        Ok(())
    }
}

/// The tasks `--task` selects (see [`Task::parse_list`]): one value holding a list, so clap
/// takes `wn-noun,lang-id` as one argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskList(pub Vec<Task>);

impl Default for TaskList {
    /// `all`: the classification tasks.
    fn default() -> Self {
        TaskList(Task::CLASSIFICATION.to_vec())
    }
}

impl FromStr for TaskList {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Task::parse_list(s).map(TaskList).map_err(Error::Invalid)
    }
}

/// `symerge data prepare`'s flags: the [`PrepareOptions`] and the tasks that share them.
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub opts: PrepareOptions,
    /// wn-noun, wn-verb, fortune-topic, lang-id; lm-de, lm-it, lm-pl, lm-eo, lm-gloss (texts for a
    /// causal LM); a comma-separated list; `all` (the four classification tasks) or `lm`.
    #[arg(long, default_value = "all")]
    pub task: TaskList,
}

impl PrepareArgs {
    /// Prepares every task in order, calling `done` with each one's summary as it is written.
    /// Every task's directory is checked before the first is written, so a refusal leaves
    /// nothing half done.
    pub fn run(&self, mut done: impl FnMut(&TaskSummary) -> Result<()>) -> Result<Vec<TaskSummary>> {
        self.opts.validate()?;
        for &task in &self.task.0 {
            check_output(task, &self.opts)?;
        }
        let mut summaries = Vec::new();
        for &task in &self.task.0 {
            let summary = prepare(task, &self.opts)?;
            done(&summary)?;
            summaries.push(summary);
        }
        Ok(summaries)
    }
}

/// What happened to the entries read. `read` = `empty + filtered + duplicates + conflicting +`
/// the deduplicated texts, which then become `small_class + over_cap +` the rows written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Entries (synsets, fortunes) read from the sources.
    pub read: usize,
    /// Empty after normalisation.
    pub empty: usize,
    /// Mostly non-letters (ASCII art, tables; fortune tasks only).
    pub filtered: usize,
    /// Cut to `max_chars` (still kept).
    pub truncated: usize,
    /// Repeats of a text already seen.
    pub duplicates: usize,
    /// Distinct texts dropped because they appear under more than one label.
    pub conflicting: usize,
    /// Texts of classes below the task's minimum size.
    pub small_class: usize,
    /// Texts over the per-class cap.
    pub over_cap: usize,
}

/// Rows per label, for each split; every label appears in each map, zeros included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub train: BTreeMap<String, usize>,
    pub validation: BTreeMap<String, usize>,
    pub test: BTreeMap<String, usize>,
}

impl Counts {
    pub fn get(&self, split: Split) -> &BTreeMap<String, usize> {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }

    fn get_mut(&mut self, split: Split) -> &mut BTreeMap<String, usize> {
        match split {
            Split::Train => &mut self.train,
            Split::Validation => &mut self.validation,
            Split::Test => &mut self.test,
        }
    }

    /// Rows in `split`.
    pub fn rows(&self, split: Split) -> usize {
        self.get(split).values().sum()
    }
}

/// `labels.json`: the label names in id order and the class counts.
#[derive(Debug, Serialize)]
struct LabelsFile<'a> {
    task: &'a str,
    labels: &'a [String],
    counts: &'a Counts,
    stats: &'a Stats,
}

/// The result of preparing one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSummary {
    pub task: String,
    /// The folder holding the task's files.
    pub dir: PathBuf,
    /// Class names in label-id order.
    pub labels: Vec<String>,
    /// Rows per split: train, validation, test.
    pub rows: BTreeMap<Split, usize>,
    pub counts: Counts,
    pub stats: Stats,
    /// Classes left out for having too few texts, with their size.
    pub small_classes: BTreeMap<String, usize>,
    /// The per-class cap applied, if any.
    pub max_per_class: Option<usize>,
}

impl TaskSummary {
    /// Rows of `label` across all splits.
    pub fn class_total(&self, label: &str) -> usize {
        Split::ALL.iter().map(|&s| self.counts.get(s).get(label).copied().unwrap_or(0)).sum()
    }
}

impl fmt::Display for TaskSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = |s: Split| self.rows.get(&s).copied().unwrap_or(0);
        writeln!(
            f,
            "{}: {} classes, {} train / {} validation / {} test rows -> {}",
            self.task,
            self.labels.len(),
            rows(Split::Train),
            rows(Split::Validation),
            rows(Split::Test),
            self.dir.display()
        )?;
        let s = &self.stats;
        writeln!(
            f,
            "  read {}; dropped {} empty, {} non-text, {} duplicate, {} with conflicting labels, {} in small classes, {} over the class cap{}; {} cut to max chars",
            s.read,
            s.empty,
            s.filtered,
            s.duplicates,
            s.conflicting,
            s.small_class,
            s.over_cap,
            self.max_per_class.map(|c| format!(" ({c})")).unwrap_or_default(),
            s.truncated
        )?;
        let classes: Vec<String> = self.labels.iter().map(|l| format!("{l} ({})", self.class_total(l))).collect();
        writeln!(f, "  classes: {}", classes.join(", "))?;
        if !self.small_classes.is_empty() {
            let small: Vec<String> = self.small_classes.iter().map(|(l, n)| format!("{l} ({n})")).collect();
            writeln!(f, "  left out (too small): {}", small.join(", "))?;
        }
        Ok(())
    }
}

/// Where `task` is written: `opts.out/<task>/`.
pub fn output_dir(task: Task, opts: &PrepareOptions) -> PathBuf {
    opts.out.join(task.name())
}

/// Refuses, before any work, a task directory that `prepare` may not replace: preparing always
/// rewrites its own earlier output (the files are the same for the same sources), but never a
/// directory symerge did not write (see [`crate::atomic::check_output_dir`]).
pub fn check_output(task: Task, opts: &PrepareOptions) -> Result<()> {
    let out = output_dir(task, opts);
    // Never inside the source tree it reads (fuzzing round 6), as every other command's output.
    crate::atomic::check_output_apart(&out, &[opts.source.as_path()])?;
    crate::atomic::check_output_dir(&out, true)
}

/// Prepares `task` from `opts.source` into `opts.out/<task>/`, which appears complete or not at
/// all and replaces only an earlier `prepare` output there (or an empty directory).
pub fn prepare(task: Task, opts: &PrepareOptions) -> Result<TaskSummary> {
    check_output(task, opts)?;
    opts.validate()?;
    tracing::info!("preparing {task} from {}", opts.source.display());
    let Collected { collector, label_order, min_class, max_per_class } = collect(task, opts)?;
    let (classes, stats) = collector.finish();
    assemble(task, opts, label_order, classes, stats, min_class, max_per_class)
}

/// Why a task has no rows, or a classification task one class: nothing read, or what became of
/// what was read (fuzzing round 5: `--max-chars 1` made every text a repeat, and the message said
/// "no examples found"; wn-verb was written with one class of one text).
fn too_little(task: Task, opts: &PrepareOptions, st: &Stats, labels: &[String]) -> String {
    let source = opts.source.display();
    if st.read == 0 {
        return format!("{task}: no examples found under {source}");
    }
    let read = st.read;
    let left = match labels {
        [one] => format!(
            "a classification task needs two classes, and of the {read} entries read under {source} only class \
             `{one}` is left"
        ),
        _ => format!("none of the {read} entries read under {source} is left"),
    };
    let fates = [
        (st.empty, "empty"),
        (st.filtered, "mostly not letters"),
        (st.duplicates, "repeats"),
        (st.conflicting, "under two labels"),
        (st.small_class, "in classes too small"),
    ];
    let fates: Vec<String> = fates.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
    let cut = if st.truncated > 0 {
        format!(
            "; {} were cut to --max-chars {}, which may be too few to tell texts apart",
            st.truncated, opts.max_chars
        )
    } else {
        String::new()
    };
    format!("{task}: {left}: {}{cut}", fates.join(", "))
}

/// A task's texts as read, with how `assemble` should treat its classes.
struct Collected {
    collector: Collector,
    label_order: Vec<String>,
    min_class: usize,
    max_per_class: Option<usize>,
}

/// Reads a task's sources into a [`Collector`].
fn collect(task: Task, opts: &PrepareOptions) -> Result<Collected> {
    let lm_cap = Some(opts.max_per_class.unwrap_or(LM_MAX_TEXTS));
    Ok(match task {
        Task::WnNoun | Task::WnVerb => {
            let pos = if task == Task::WnNoun { Pos::Noun } else { Pos::Verb };
            let mut c = Collector::new(opts.max_chars, false);
            for synset in wordnet::read_synsets(&opts.source, pos)? {
                c.add(&synset.gloss, synset.lexname);
            }
            let order = pos.labels().into_iter().map(String::from).collect();
            Collected { collector: c, label_order: order, min_class: 1, max_per_class: opts.max_per_class }
        }
        Task::FortuneTopic => collect_topics(opts)?,
        Task::LangId => collect_languages(fortune::LANGUAGES.iter().collect(), opts, LANG_ID_MAX_PER_CLASS)?,
        Task::LmFortunes(code) => {
            let lang = fortune::LANGUAGES
                .iter()
                .find(|l| l.code == code)
                .ok_or_else(|| Error::Invalid(format!("{task}: no fortunes language `{code}`")))?;
            let c = collect_languages(vec![lang], opts, LM_MAX_TEXTS)?;
            if c.label_order.is_empty() {
                return Err(Error::MissingSource {
                    path: opts.source.join(fortune::GAMES_DIR),
                    package: lang.package.into(),
                });
            }
            c
        }
        Task::LmGloss => {
            let mut c = Collector::new(opts.max_chars, false);
            for pos in [Pos::Noun, Pos::Verb] {
                for synset in wordnet::read_synsets(&opts.source, pos)? {
                    c.add(&synset.gloss, "en");
                }
            }
            Collected { collector: c, label_order: vec!["en".into()], min_class: 1, max_per_class: lm_cap }
        }
    })
}

/// `fortune-topic`: English fortunes by category.
fn collect_topics(opts: &PrepareOptions) -> Result<Collected> {
    let mut c = Collector::new(opts.max_chars, true);
    let mut order = Vec::new();
    for (name, path) in fortune::english_files(&opts.source)? {
        if TOPIC_EXCLUDED.contains(&name.as_str()) {
            continue;
        }
        for entry in fortune::read_entries(&path)? {
            c.add(&entry, &name);
        }
        order.push(name);
    }
    order.sort();
    Ok(Collected { collector: c, label_order: order, min_class: TOPIC_MIN_ENTRIES, max_per_class: opts.max_per_class })
}

/// Fortunes labelled by language, the languages without files skipped (with a warning unless
/// optional); `default_cap` applies unless `--max-per-class` is given.
fn collect_languages(langs: Vec<&fortune::Language>, opts: &PrepareOptions, default_cap: usize) -> Result<Collected> {
    let mut c = Collector::new(opts.max_chars, true);
    let mut order = Vec::new();
    for lang in langs {
        let files = fortune::language_files(&opts.source, lang)?;
        if files.is_empty() {
            let why = format!("no `{}` fortunes (package {})", lang.code, lang.package);
            if lang.optional {
                tracing::debug!("{why}, skipping");
            } else {
                tracing::warn!("{why} under {}, skipping", opts.source.display());
            }
            continue;
        }
        for (_, path) in files {
            for entry in fortune::read_entries(&path)? {
                c.add(&entry, lang.code);
            }
        }
        order.push(lang.code.to_string());
    }
    let cap = Some(opts.max_per_class.unwrap_or(default_cap));
    Ok(Collected { collector: c, label_order: order, min_class: 1, max_per_class: cap })
}

/// Normalises, filters, caps and deduplicates entries as they are read.
struct Collector {
    max_chars: usize,
    letters_only: bool,
    stats: Stats,
    /// Text -> its label, or `None` once it was seen under two labels.
    texts: HashMap<String, Option<String>>,
}

impl Collector {
    fn new(max_chars: usize, letters_only: bool) -> Self {
        Collector { max_chars, letters_only, stats: Stats::default(), texts: HashMap::new() }
    }

    fn add(&mut self, raw: &str, label: &str) {
        self.stats.read += 1;
        let mut t = text::normalise(raw);
        if t.is_empty() {
            self.stats.empty += 1;
            return;
        }
        if self.letters_only && !text::mostly_letters(&t) {
            self.stats.filtered += 1;
            return;
        }
        if text::cap_chars(&mut t, self.max_chars) {
            self.stats.truncated += 1;
        }
        match self.texts.get_mut(&t) {
            None => {
                self.texts.insert(t, Some(label.to_string()));
            }
            Some(seen) => {
                self.stats.duplicates += 1;
                if seen.as_deref().is_some_and(|l| l != label) {
                    *seen = None;
                }
            }
        }
    }

    /// Texts by label (each sorted), and the stats. A conflicting text's first copy counts as
    /// conflicting and its later copies as duplicates.
    fn finish(mut self) -> (BTreeMap<String, Vec<String>>, Stats) {
        let mut classes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (t, label) in self.texts {
            match label {
                Some(l) => classes.entry(l).or_default().push(t),
                None => self.stats.conflicting += 1,
            }
        }
        for texts in classes.values_mut() {
            texts.sort_unstable();
        }
        (classes, self.stats)
    }
}

/// Drops small classes, applies the class cap, splits, and writes the task's files.
fn assemble(
    task: Task,
    opts: &PrepareOptions,
    label_order: Vec<String>,
    mut classes: BTreeMap<String, Vec<String>>,
    mut stats: Stats,
    min_class: usize,
    max_per_class: Option<usize>,
) -> Result<TaskSummary> {
    let mut labels = Vec::new();
    let mut small_classes = BTreeMap::new();
    let mut rows: Vec<(Split, u64, String, usize)> = Vec::new();
    for label in label_order {
        let Some(mut texts) = classes.remove(&label) else { continue };
        if texts.len() < min_class {
            stats.small_class += texts.len();
            small_classes.insert(label, texts.len());
            continue;
        }
        if let Some(cap) = max_per_class.filter(|&c| texts.len() > c) {
            texts.sort_by_cached_key(|t| (cap_order(t), t.clone()));
            stats.over_cap += texts.len() - cap;
            texts.truncate(cap);
        }
        let id = labels.len();
        labels.push(label);
        rows.extend(texts.into_iter().map(|t| (Split::of(&t), stable_hash(&t), t, id)));
    }
    if let Some(stray) = classes.keys().next() {
        return Err(Error::Invalid(format!("{task}: label `{stray}` is not among the task's classes")));
    }
    if labels.len() < if task.is_lm() { 1 } else { 2 } {
        return Err(Error::Invalid(too_little(task, opts, &stats, &labels)));
    }
    // Hash order mixes the classes, so a reader taking the first N rows gets all of them.
    rows.sort_unstable_by(|a, b| (a.1, &a.2).cmp(&(b.1, &b.2)));

    let dir = opts.out.join(task.name());
    let staging = Staging::create(&dir)?;
    let mut counts = Counts::default();
    for split in Split::ALL {
        counts.get_mut(split).extend(labels.iter().map(|l| (l.clone(), 0)));
    }
    for split in Split::ALL {
        let records = rows.iter().filter(|r| r.0 == split).map(|(_, _, text, id)| {
            *counts.get_mut(split).entry(labels[*id].clone()).or_default() += 1;
            Record { text, label: &labels[*id], label_id: *id }
        });
        let bytes = to_jsonl(records)?;
        let path = staging.path().join(format!("{split}.jsonl"));
        std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
    }
    let labels_file = LabelsFile { task: task.name(), labels: &labels, counts: &counts, stats: &stats };
    let mut json = serde_json::to_vec_pretty(&labels_file)
        .map_err(|e| Error::Invalid(format!("{task}: serialising labels.json: {e}")))?;
    json.push(b'\n');
    let path = staging.path().join("labels.json");
    std::fs::write(&path, &json).map_err(|e| Error::io(&path, e))?;
    staging.commit(&dir, true)?;

    let rows = Split::ALL.iter().map(|&s| (s, counts.rows(s))).collect();
    tracing::debug!("{task}: wrote {}", dir.display());
    Ok(TaskSummary { task: task.name().to_string(), dir, labels, rows, counts, stats, small_classes, max_per_class })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::parse_args;

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let args: PrepareArgs = parse_args(&["--out", "data"]).unwrap();
        let want = PrepareArgs { opts: PrepareOptions::new("data"), task: TaskList::default() };
        assert_eq!(format!("{args:?}"), format!("{want:?}"));
        let args: PrepareArgs = parse_args(&["--out", "d", "--task", "lm-de,wn-noun"]).unwrap();
        assert_eq!(args.task, TaskList(vec![Task::LmFortunes("de"), Task::WnNoun]));
        let bad = parse_args::<PrepareArgs>(&["--out", "d", "--task", "wn-adj"]).err().unwrap();
        assert!(bad.to_string().contains("unknown task `wn-adj`"), "{bad}");
    }

    #[test]
    fn limits_that_leave_nothing_are_refused() {
        assert!(PrepareOptions::new("d").validate().is_ok());
        let zero_chars = PrepareOptions { max_chars: 0, ..PrepareOptions::new("d") };
        assert!(zero_chars.validate().unwrap_err().to_string().contains("--max-chars"));
        let zero_cap = PrepareOptions { max_per_class: Some(0), ..PrepareOptions::new("d") };
        assert!(zero_cap.validate().unwrap_err().to_string().contains("--max-per-class"));
    }
}
