//! What the BERT and Llama `config.json` readers share: deserializing with errors that name the
//! file and the field, the model's identity, and field types that carry their own range check.
//!
//! Unknown keys are ignored on purpose: Hugging Face configs carry many fields we do not need.

use std::fmt;
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};
use serde_json::Value;

use crate::error::{Error, Result};

/// Deserializes `T` from a `config.json` value; an error names `path` and the field (dotted
/// path) that failed, e.g. "field `rope_scaling.factor`: invalid type: ...".
pub(crate) fn parse<'de, T: Deserialize<'de>>(v: &'de Value, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let reason = match e.path().iter().next() {
            // A missing field is reported on its parent, and serde's message names it.
            None => e.inner().to_string(),
            Some(_) => format!("field `{}`: {}", e.path(), e.inner()),
        };
        Error::Model { path: path.to_path_buf(), reason }
    })
}

/// Which model a config describes: `model_type`, else the class names in `architectures`.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ModelKind {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

impl ModelKind {
    /// `model_type`, or "" when absent (the family then comes from `architectures`).
    pub fn model_type(&self) -> &str {
        self.model_type.as_deref().unwrap_or("")
    }

    /// Whether some architecture's class name starts with one of `prefixes`.
    pub fn has_arch(&self, prefixes: &[&str]) -> bool {
        self.architectures.iter().flatten().any(|a| prefixes.iter().any(|p| a.starts_with(p)))
    }

    /// The architectures as listed, for error messages.
    pub fn arch_list(&self) -> &[String] {
        self.architectures.as_deref().unwrap_or_default()
    }
}

/// A size that must be at least 1 (layers, heads, widths): zero would make an empty model. Sizes
/// are also at most [`MAX_SIZE`], so that a product of two never wraps: a `head_dim` of 2^63+16
/// times 4 heads wrapped to the real tensors' 64 columns and passed every shape check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Positive(pub usize);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Positive;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a positive integer up to 2^32")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<Positive, E> {
                match usize::try_from(n) {
                    Ok(n) if n > 0 && n <= MAX_SIZE => Ok(Positive(n)),
                    _ => Err(E::invalid_value(Unexpected::Unsigned(n), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<Positive, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
                }
            }
        }
        d.deserialize_u64(V)
    }
}

/// The largest size a config.json field may give, far beyond any real model's.
pub(crate) const MAX_SIZE: usize = 1 << 32;

/// A finite number above 0 (epsilons, RoPE theta and factors), read as f64 like the JSON, that
/// stays finite and above 0 in f32, where the model uses it: a `rope_theta` of 1e300 became
/// infinite there and failed inside the rotary op, naming neither the file nor the field.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PositiveF64(pub f64);

/// What [`PositiveF64`] accepts, also asked of GGUF metadata that `import-gguf` writes into a
/// config.json: finite, above 0, and a normal f32 once cast (a subnormal epsilon would pass
/// the import and then be refused by every command that reads the imported config).
pub(crate) fn positive_in_f32(x: f64) -> bool {
    x.is_finite() && x > 0.0 && (x as f32).is_finite() && (x as f32) >= f32::MIN_POSITIVE
}

/// How the rule reads in messages.
pub(crate) const POSITIVE_IN_F32: &str = "a positive number within f32's range (about 1.2e-38 to 3.4e38)";

impl<'de> Deserialize<'de> for PositiveF64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PositiveF64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(POSITIVE_IN_F32)
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> std::result::Result<PositiveF64, E> {
                if positive_in_f32(x) { Ok(PositiveF64(x)) } else { Err(E::invalid_value(Unexpected::Float(x), &self)) }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<PositiveF64, E> {
                self.visit_f64(n as f64)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<PositiveF64, E> {
                self.visit_f64(n as f64)
            }
        }
        d.deserialize_f64(V)
    }
}

/// For `#[serde(default, deserialize_with = "present")]`: the field may be absent (the default
/// applies) but not `null`, which would stand for no value where the model needs one.
pub(crate) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}
