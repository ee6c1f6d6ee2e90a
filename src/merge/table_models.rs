//! Checks that a merge config lists the experts of a Lambda table in the table's coefficient
//! order. Column k of a table `symerge adapt` wrote belongs to task k's expert; applied to a
//! reordered list it gives each expert another task's coefficients, and nothing in the merge
//! itself notices (same shapes, same count). Experts are compared by content, not by path, so
//! a moved or copied expert still matches.

use std::path::Path;

use super::config::{LambdaTable, MergeConfig, RecordedModel};
use crate::checkpoint::lora;
use crate::error::{Error, Result};
use crate::labels::fingerprint::model_sketch;

/// Refuses a config whose base or experts are not the ones `table` records, in its order. A
/// table without records (written by an earlier `adapt`) is logged as unchecked.
pub fn check(config: &MergeConfig, table: &LambdaTable) -> Result<()> {
    let Some(experts) = &table.experts else {
        tracing::info!(
            "{} records no expert fingerprints (an earlier symerge adapt wrote it): the order of `models` \
             cannot be checked; it must be the adapt config's task order",
            table.path.display()
        );
        return Ok(());
    };
    if let (Some(base), Some(recorded)) = (&config.base_model, &table.base)
        && sketch(base)?.as_deref() != Some(recorded.fingerprint.as_str())
    {
        let reason = format!(
            "base_model {} is not the base {} was learned with ({})",
            base.display(),
            table.path.display(),
            recorded.path.display()
        );
        return Err(Error::Config { path: config.source.clone(), reason });
    }
    let mut misplaced = Vec::new();
    for (i, model) in config.models.iter().enumerate() {
        let have = sketch(&model.path)?;
        let holds = |e: &RecordedModel| have.as_deref() == Some(e.fingerprint.as_str());
        if experts.get(i).is_some_and(holds) {
            continue;
        }
        let Some(j) = experts.iter().position(holds) else {
            let reason = format!(
                "models[{i}] ({}) is none of the experts {} was learned with: {}",
                model.path.display(),
                table.path.display(),
                listing(experts)
            );
            return Err(Error::Config { path: config.source.clone(), reason });
        };
        misplaced.push(format!("models[{i}] ({}) is {} (column {j})", model.path.display(), name(&experts[j], j)));
    }
    if misplaced.is_empty() {
        return Ok(());
    }
    let reason = format!(
        "the models are not in the order of {}'s columns: {}; list them in that order (the adapt config's task \
         order): {}",
        table.path.display(),
        misplaced.join(", "),
        listing(experts)
    );
    Err(Error::Config { path: config.source.clone(), reason })
}

/// The model's sketch; `None` for a `model+lora` reference, which no recorded expert is.
fn sketch(path: &Path) -> Result<Option<String>> {
    match lora::split_ref(path) {
        Some(_) => Ok(None),
        None => model_sketch(path).map(Some),
    }
}

/// "task `a`'s expert", or "expert j" for a record without a task.
fn name(e: &RecordedModel, j: usize) -> String {
    match &e.task {
        Some(t) => format!("task `{t}`'s expert"),
        None => format!("expert {j}"),
    }
}

/// The recorded experts in column order, as "0: task (path)".
fn listing(experts: &[RecordedModel]) -> String {
    let items: Vec<String> = experts
        .iter()
        .enumerate()
        .map(|(j, e)| format!("{j}: {} ({})", e.task.as_deref().unwrap_or("?"), e.path.display()))
        .collect();
    items.join(", ")
}
