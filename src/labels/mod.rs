//! Expert soft labels cached on disk, so adaptation trains against K experts' outputs without
//! keeping K experts loaded: the file format ([`cache`]) and the fingerprints that tie a cache
//! to the expert, tokenizer and inputs that made it ([`fingerprint`]).

pub mod cache;
pub mod fingerprint;
pub mod produce;

pub use cache::{CacheWriter, LabelCache, LabelKind, Provenance, TopKLabels};
