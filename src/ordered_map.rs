//! A JSON or YAML mapping read as a list of its entries in document order, where the order
//! means something (PEFT's `alpha_pattern` takes the first matching key, mergekit adds the
//! `tokenizer.tokens` in the order written) and a sorted map would lose it.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

/// Deserializes a mapping into its `(key, value)` entries in order (for `deserialize_with`).
pub fn entries<'de, D, V>(d: D) -> Result<Vec<(String, V)>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Entries<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry()? {
                out.push(entry);
            }
            Ok(out)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
    }
    d.deserialize_map(Entries(PhantomData))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct T {
        #[serde(deserialize_with = "super::entries")]
        m: Vec<(String, f64)>,
    }

    #[test]
    fn keeps_document_order() {
        let t: T = serde_json::from_str(r#"{"m": {"b": 1, "a": 2, "c": 3}}"#).unwrap();
        assert_eq!(t.m, vec![("b".into(), 1.0), ("a".into(), 2.0), ("c".into(), 3.0)]);
        let t: T = serde_yaml_ng::from_str("m: {z: 1, y: 2}").unwrap();
        assert_eq!(t.m, vec![("z".into(), 1.0), ("y".into(), 2.0)]);
    }
}
