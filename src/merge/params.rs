//! mergekit-style parameter values: a number, a gradient over layers (`[0, 0.5, 1]`), or a list
//! of `{filter, value}` entries chosen by a substring of the tensor name.

use serde::Deserialize;

/// One parameter as written in a config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(from = "WrittenValue")]
pub enum ParamValue {
    Bool(bool),
    Number(f64),
    Text(String),
    Gradient(Vec<f64>),
    Filtered(Vec<FilteredValue>),
}

/// What a value must be, in every message about one.
const EXPECTING: &str =
    "not a parameter value (a number, true or false, a list of numbers for a gradient, or {filter, value} entries)";

/// The forms mergekit's `ParameterSetting` takes; a lone `{filter, value}` entry (or `{value}`)
/// is read as a list of one.
enum WrittenValue {
    Bool(bool),
    Number(f64),
    Text(String),
    Gradient(Vec<f64>),
    Texts(Vec<String>),
    Filtered(Vec<FilteredValue>),
    One(Box<FilteredValue>),
}

/// A value as written, before its form is decided.
enum Node {
    Bool(bool),
    Number(f64),
    Text(String),
    Entry(FilteredValue),
    List(Vec<Node>),
}

/// Dispatches on the value's kind instead of trying each form in turn (serde's untagged enums),
/// so an entry's own error comes through: `{filter: mlp, value: 0.1, value: 0.9}` is "duplicate
/// field `value`", not "not a parameter value" (fuzzing round 7).
struct NodeVisitor;

impl<'de> serde::de::Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(EXPECTING)
    }
    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Node, E> {
        Ok(Node::Bool(b))
    }
    fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Node, E> {
        Ok(Node::Number(x))
    }
    fn visit_i64<E: serde::de::Error>(self, x: i64) -> Result<Node, E> {
        Ok(Node::Number(x as f64))
    }
    fn visit_u64<E: serde::de::Error>(self, x: u64) -> Result<Node, E> {
        Ok(Node::Number(x as f64))
    }
    fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Node, E> {
        Ok(Node::Text(t.to_string()))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Node, E> {
        Err(E::custom(EXPECTING))
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Node, E> {
        Err(E::custom(EXPECTING))
    }
    /// A `{filter, value}` entry, read key by key so its own errors read plainly.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        use serde::de::Error as _;
        let (mut filter, mut value) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            let twice = match key.as_str() {
                "filter" => filter.replace(map.next_value::<Option<String>>()?).is_some(),
                "value" => value.replace(map.next_value::<ParamValue>()?).is_some(),
                other => {
                    return Err(A::Error::custom(format!(
                        "unknown field `{other}` in a {{filter, value}} entry (expected `filter` or `value`)"
                    )));
                }
            };
            if twice {
                return Err(A::Error::custom(format!("`{key}` given twice in a {{filter, value}} entry")));
            }
        }
        let value = value.ok_or_else(|| A::Error::custom("a {filter, value} entry without `value`"))?;
        Ok(Node::Entry(FilteredValue { filter: filter.flatten(), value }))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::List(items))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

impl TryFrom<Node> for WrittenValue {
    type Error = &'static str;

    fn try_from(node: Node) -> Result<Self, Self::Error> {
        /// Every item of the form `pick` takes, or `None`.
        fn all<T>(items: Vec<Node>, pick: fn(Node) -> Option<T>) -> Option<Vec<T>> {
            items.into_iter().map(pick).collect()
        }
        Ok(match node {
            Node::Bool(b) => WrittenValue::Bool(b),
            Node::Number(x) => WrittenValue::Number(x),
            Node::Text(t) => WrittenValue::Text(t),
            Node::Entry(e) => WrittenValue::One(Box::new(e)),
            Node::List(items) => match items.first() {
                None | Some(Node::Number(_)) => {
                    all(items, |n| if let Node::Number(x) = n { Some(x) } else { None }).map(WrittenValue::Gradient)
                }
                Some(Node::Text(_)) => {
                    all(items, |n| if let Node::Text(t) = n { Some(t) } else { None }).map(WrittenValue::Texts)
                }
                Some(Node::Entry(_)) => {
                    all(items, |n| if let Node::Entry(e) = n { Some(e) } else { None }).map(WrittenValue::Filtered)
                }
                Some(_) => None,
            }
            .ok_or(EXPECTING)?,
        })
    }
}

impl<'de> Deserialize<'de> for WrittenValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WrittenValue::try_from(Node::deserialize(d)?).map_err(<D::Error as serde::de::Error>::custom)
    }
}

impl From<WrittenValue> for ParamValue {
    fn from(v: WrittenValue) -> Self {
        match v {
            WrittenValue::Bool(b) => ParamValue::Bool(b),
            WrittenValue::Number(x) => ParamValue::Number(x),
            WrittenValue::Text(t) => ParamValue::Text(t),
            WrittenValue::Gradient(g) => ParamValue::Gradient(g),
            // pydantic makes each quoted number a float for mergekit (fuzzing round 7).
            WrittenValue::Texts(t) => match t.iter().map(|x| parse_number(x)).collect() {
                Some(points) => ParamValue::Gradient(points),
                None => ParamValue::Text(format!("{t:?}")),
            },
            WrittenValue::Filtered(f) => ParamValue::Filtered(f),
            WrittenValue::One(one) => ParamValue::Filtered(vec![*one]),
        }
    }
}

/// A `parameters` mapping whose errors name the parameter: serde's path stops at the mapping, so
/// `normalize: [true, false]` was reported as "parameters: not a parameter value".
pub fn named_values<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, ParamValue>, D::Error> {
    struct Named;
    impl<'de> serde::de::Visitor<'de> for Named {
        type Value = std::collections::BTreeMap<String, ParamValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a mapping of parameter names to values")
        }
        // `parameters: null` (what yaml.dump writes for None) is no parameters, as for mergekit.
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(std::collections::BTreeMap::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(std::collections::BTreeMap::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                // Read whole first: an error from inside the value then carries neither the
                // YAML path nor a position, which the message below and its caller add once.
                let written = map.next_value::<serde_yaml_ng::Value>()?;
                let value = ParamValue::deserialize(written)
                    .map_err(|e| <A::Error as serde::de::Error>::custom(format!("{key}: {e}")))?;
                if out.insert(key.clone(), value).is_some() {
                    return Err(<A::Error as serde::de::Error>::custom(format!("{key}: given twice")));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_any(Named)
}

/// `{filter: "self_attn", value: 0.5}`; an entry without `filter`, or with `filter: "*"`, matches
/// every tensor (mergekit's wildcard).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilteredValue {
    #[serde(default)]
    pub filter: Option<String>,
    pub value: ParamValue,
}

impl ParamValue {
    /// The number for `tensor`, whose block sits at `position` in [0, 1] of the stream
    /// (embeddings 0, last head 1). `None` when a filter list matches nothing.
    pub fn number_for(&self, tensor: &str, position: f64) -> Option<f64> {
        match self {
            ParamValue::Number(x) => Some(*x),
            ParamValue::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            ParamValue::Text(_) => None,
            // mergekit's `evaluate_setting` takes an empty list as not set here.
            ParamValue::Gradient(points) if points.is_empty() => None,
            ParamValue::Gradient(points) => Some(interpolate(points, position)),
            ParamValue::Filtered(items) => items
                .iter()
                .find(|it| it.filter.as_deref().is_none_or(|f| f == "*" || tensor.contains(f)))
                .and_then(|it| it.value.number_for(tensor, position)),
        }
    }

    /// Checks the value is numeric in every form, so errors surface before merging starts.
    pub fn check_numeric(&self) -> Result<(), String> {
        match self {
            ParamValue::Number(x) if x.is_finite() => Ok(()),
            ParamValue::Number(x) => Err(format!("{x} is not a finite number")),
            ParamValue::Bool(_) => Err("expected a number, got a boolean".into()),
            ParamValue::Text(t) => Err(format!("expected a number, got `{t}`")),
            ParamValue::Gradient(p) => match p.iter().find(|x| !x.is_finite()) {
                Some(x) => Err(format!("{x} is not a finite number")),
                None => Ok(()),
            },
            ParamValue::Filtered(items) => items.iter().try_for_each(|i| i.value.check_numeric()),
        }
    }

    /// A number written as a string (`weight: "0.3"`) made a number, as pydantic coerces it for
    /// mergekit; inside filtered lists too. Other strings stay as they are.
    pub fn coerce_numeric(&mut self) {
        match self {
            ParamValue::Text(t) => {
                if let Some(x) = parse_number(t) {
                    *self = ParamValue::Number(x);
                }
            }
            ParamValue::Filtered(items) => items.iter_mut().for_each(|i| i.value.coerce_numeric()),
            _ => {}
        }
    }

    /// A switch written as pydantic's lax booleans take it for mergekit: 0 or 1, and the words
    /// true/false, yes/no, on/off, t/f, y/n, 1/0 in any case (fuzzing round 7: `normalize: 0`
    /// and a quoted `"false"` were refused). Other values stay as they are.
    pub fn coerce_bool(&mut self) {
        let b = match self {
            ParamValue::Number(x) if *x == 0.0 || *x == 1.0 => *x == 1.0,
            ParamValue::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "t" | "y" | "1" => true,
                "false" | "no" | "off" | "f" | "n" | "0" => false,
                _ => return,
            },
            _ => return,
        };
        *self = ParamValue::Bool(b);
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            ParamValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// A number as Python reads one for mergekit: Rust's float syntax, and digits grouped by
/// underscores (`1_0` is 10 for PyYAML and for `float()`).
fn parse_number(t: &str) -> Option<f64> {
    let t = t.trim();
    if let Ok(x) = t.parse::<f64>() {
        return Some(x);
    }
    let b = t.as_bytes();
    let grouped = (0..b.len())
        .filter(|&i| b[i] == b'_')
        .all(|i| i > 0 && i + 1 < b.len() && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit());
    if grouped && t.contains('_') { t.replace('_', "").parse().ok() } else { None }
}

/// Piecewise-linear interpolation of evenly spaced points over [0, 1] (numpy's `interp`).
fn interpolate(points: &[f64], position: f64) -> f64 {
    match points.len() {
        0 => 0.0,
        1 => points[0],
        n => {
            let x = position.clamp(0.0, 1.0) * (n - 1) as f64;
            let i = (x.floor() as usize).min(n - 2);
            let f = x - i as f64;
            points[i] * (1.0 - f) + points[i + 1] * f
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_gradient_and_filters() {
        let v: ParamValue = serde_yaml_ng::from_str("0.7").unwrap();
        assert_eq!(v.number_for("x", 0.3), Some(0.7));
        let g: ParamValue = serde_yaml_ng::from_str("[0.0, 1.0, 0.0]").unwrap();
        assert_eq!(g.number_for("x", 0.0), Some(0.0));
        assert_eq!(g.number_for("x", 0.25), Some(0.5));
        assert_eq!(g.number_for("x", 0.5), Some(1.0));
        assert_eq!(g.number_for("x", 1.0), Some(0.0));
        let f: ParamValue =
            serde_yaml_ng::from_str("[{filter: self_attn, value: 0.1}, {filter: mlp, value: [0, 1]}, {value: 0.5}]")
                .unwrap();
        assert_eq!(f.number_for("model.layers.0.self_attn.q_proj.weight", 0.5), Some(0.1));
        assert_eq!(f.number_for("model.layers.0.mlp.up_proj.weight", 0.5), Some(0.5));
        assert_eq!(f.number_for("model.norm.weight", 0.9), Some(0.5));
        assert!(f.check_numeric().is_ok());
        let bad: ParamValue = serde_yaml_ng::from_str("[{filter: a, value: yes}]").unwrap();
        assert!(bad.check_numeric().is_err());
    }
}
