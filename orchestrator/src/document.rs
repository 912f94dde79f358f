//! The JSON documents a saga carries (its input, each step's output) and their wire form,
//! `google.protobuf.Struct`. A document is checked here once, where it enters sagad, against
//! everything that happens to it later: Postgres must store it (no NUL character), a `Struct`
//! must carry it back exactly (finite numbers no larger than 2^53), and it must stay small.
//! A document that passed is never refused further down, so it cannot poison a batch of writes
//! or make a saga unreadable. No IO here.

use std::collections::HashMap;

use pbjson_types::value::Kind;
use pbjson_types::{ListValue, Struct, Value as WireValue};
use serde_json::{Map, Number, Value};

use crate::saga::Context;

/// The largest magnitude of a number accepted: beyond 2^53 a double no longer holds every
/// integer, so the number a client meant is not the number it sent.
pub const MAX_EXACT_NUMBER: f64 = 9_007_199_254_740_992.0;

/// How deeply objects and lists may nest. Each level of an object is three levels of protobuf
/// messages (`Struct`, its map entry, `Value`), a document travels inside envelopes (the saga
/// context in a `StepCommand`, a `Saga` in a `ListSagasResponse`), and gRPC peers refuse to
/// decode more than 100 levels (prost's limit, and others'): 20 keeps every message sagad sends
/// within reach of every peer.
pub const MAX_DEPTH: usize = 20;

/// A part of a document that sagad cannot keep: `field` is its path (`input.items[0].sku`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct DocumentError {
    pub field: String,
    pub problem: String,
}

/// Converts a `Struct` to JSON, checking every value; `root` names the document in errors.
/// Whole numbers become JSON integers (`5`, not `5.0`).
pub fn from_struct(document: &Struct, root: &str) -> Result<Value, DocumentError> {
    object_from_wire(&document.fields, root, 1)
}

/// Checks a JSON document as [`from_struct`] does, for documents that arrive as JSON.
pub fn check(document: &Value, root: &str) -> Result<(), DocumentError> {
    check_value(document, root, 0)
}

/// The size of a document as stored (compact JSON), in bytes; counted, not written out.
pub fn size_of(document: &impl serde::Serialize) -> usize {
    /// Counts the bytes written to it.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(bytes.len());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, document) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

/// Refuses a document larger than `limit` bytes as compact JSON.
pub fn check_size(document: &Value, limit: usize, root: &str) -> Result<(), DocumentError> {
    let size = size_of(document);
    if size > limit {
        return Err(DocumentError {
            field: root.to_owned(),
            problem: format!("is {size} bytes as JSON, over the limit of {limit}"),
        });
    }
    Ok(())
}

/// A JSON document as a `Struct`. A document that is not an object is wrapped as
/// `{"value": …}`; `null` is no document at all. Never fails: numbers are sent as doubles.
pub fn to_struct(document: &Value) -> Option<Struct> {
    match document {
        Value::Null => None,
        Value::Object(fields) => Some(struct_of(fields)),
        other => {
            let mut fields = Map::new();
            fields.insert("value".to_owned(), other.clone());
            Some(struct_of(&fields))
        }
    }
}

/// A saga's context as a `Struct`, made straight from the saga's documents.
pub fn context_struct(context: &Context<'_>) -> Struct {
    let steps = Struct {
        fields: context
            .outputs
            .iter()
            .map(|(name, output)| ((*name).to_owned(), to_wire(output)))
            .collect(),
    };
    Struct {
        fields: HashMap::from([
            ("input".to_owned(), to_wire(context.input)),
            (
                "steps".to_owned(),
                WireValue {
                    kind: Some(Kind::StructValue(steps)),
                },
            ),
        ]),
    }
}

fn struct_of(fields: &Map<String, Value>) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(key, value)| (key.clone(), to_wire(value)))
            .collect(),
    }
}

fn to_wire(value: &Value) -> WireValue {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(flag) => Kind::BoolValue(*flag),
        Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or_default()),
        Value::String(text) => Kind::StringValue(text.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_wire).collect(),
        }),
        Value::Object(fields) => Kind::StructValue(struct_of(fields)),
    };
    WireValue { kind: Some(kind) }
}

fn object_from_wire(
    fields: &HashMap<String, WireValue>,
    path: &str,
    depth: usize,
) -> Result<Value, DocumentError> {
    check_depth(path, depth)?;
    // In key order, so that the first problem reported is always the same one.
    let mut sorted: Vec<(&String, &WireValue)> = fields.iter().collect();
    sorted.sort_unstable_by_key(|(key, _)| *key);
    let mut object = Map::with_capacity(fields.len());
    for (key, value) in sorted {
        let field = member(path, key);
        if key.contains('\0') {
            return Err(nul(&field, "its key"));
        }
        object.insert(key.clone(), value_from_wire(value, &field, depth)?);
    }
    Ok(Value::Object(object))
}

fn value_from_wire(value: &WireValue, path: &str, depth: usize) -> Result<Value, DocumentError> {
    // A value with no kind set is null: serde's form of a Struct (pbjson) makes JSON null so.
    let Some(kind) = &value.kind else {
        return Ok(Value::Null);
    };
    Ok(match kind {
        Kind::NullValue(_) => Value::Null,
        Kind::BoolValue(flag) => Value::Bool(*flag),
        Kind::NumberValue(number) => Value::Number(exact_number(*number, path)?),
        Kind::StringValue(text) => {
            if text.contains('\0') {
                return Err(nul(path, "the string"));
            }
            Value::String(text.clone())
        }
        Kind::StructValue(object) => object_from_wire(&object.fields, path, depth + 1)?,
        Kind::ListValue(list) => {
            check_depth(path, depth + 1)?;
            let items = list
                .values
                .iter()
                .enumerate()
                .map(|(index, item)| value_from_wire(item, &format!("{path}[{index}]"), depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            Value::Array(items)
        }
    })
}

fn check_value(value: &Value, path: &str, depth: usize) -> Result<(), DocumentError> {
    match value {
        Value::Null | Value::Bool(_) => Ok(()),
        Value::Number(number) => {
            // serde_json holds only finite numbers; an integer it holds exactly may still be
            // one a double cannot.
            let exact = match (number.as_i64(), number.as_u64()) {
                (Some(int), _) => int.unsigned_abs() <= MAX_EXACT_NUMBER as u64,
                (None, Some(int)) => int <= MAX_EXACT_NUMBER as u64,
                (None, None) => number
                    .as_f64()
                    .is_some_and(|float| exact_number(float, path).is_ok()),
            };
            if exact {
                Ok(())
            } else {
                Err(beyond_exact(path, &number.to_string()))
            }
        }
        Value::String(text) => {
            if text.contains('\0') {
                Err(nul(path, "the string"))
            } else {
                Ok(())
            }
        }
        Value::Array(items) => {
            check_depth(path, depth + 1)?;
            items.iter().enumerate().try_for_each(|(index, item)| {
                check_value(item, &format!("{path}[{index}]"), depth + 1)
            })
        }
        Value::Object(fields) => {
            check_depth(path, depth + 1)?;
            fields.iter().try_for_each(|(key, item)| {
                let field = member(path, key);
                if key.contains('\0') {
                    return Err(nul(&field, "its key"));
                }
                check_value(item, &field, depth + 1)
            })
        }
    }
}

/// A double as a JSON number, if a `Struct` carries it back unchanged.
fn exact_number(number: f64, path: &str) -> Result<Number, DocumentError> {
    if !number.is_finite() {
        return Err(DocumentError {
            field: path.to_owned(),
            problem: format!("{number} is not a finite number"),
        });
    }
    if number.abs() > MAX_EXACT_NUMBER {
        return Err(beyond_exact(path, &format!("{number:e}")));
    }
    if number.fract() == 0.0 {
        // Exact: the magnitude is at most 2^53.
        return Ok(Number::from(number as i64));
    }
    Number::from_f64(number).ok_or_else(|| DocumentError {
        field: path.to_owned(),
        problem: format!("{number} is not a finite number"),
    })
}

fn beyond_exact(path: &str, shown: &str) -> DocumentError {
    DocumentError {
        field: path.to_owned(),
        problem: format!(
            "{} is larger than 2^53 in magnitude, which a google.protobuf.Struct (a double) \
             cannot carry exactly; send it as a string",
            shorten(shown, 40)
        ),
    }
}

fn check_depth(path: &str, depth: usize) -> Result<(), DocumentError> {
    if depth > MAX_DEPTH {
        return Err(DocumentError {
            field: path.to_owned(),
            problem: format!("nests deeper than {MAX_DEPTH} levels"),
        });
    }
    Ok(())
}

fn nul(path: &str, what: &str) -> DocumentError {
    DocumentError {
        field: path.to_owned(),
        problem: format!("{what} holds a NUL character, which cannot be stored"),
    }
}

/// `path.key`, or `path["key"]` when the key is not a plain name, cut to a readable length.
fn member(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("{path}.{}", shorten(key, 64))
    } else {
        format!("{path}[{:?}]", shorten(key, 64))
    }
}

/// A text field the store keeps or searches (an idempotency key, a reason, a search): no NUL
/// character (Postgres refuses it), and no longer than `max` bytes. The error says which field.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!(
            "{field} holds a NUL character, which cannot be stored"
        ));
    }
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes, over the limit of {max}",
            value.len()
        ));
    }
    Ok(())
}

/// At most `max` characters of `text`, with `…` when it was cut: for echoing what a client
/// sent in an error message, however long it was.
pub fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wire(value: Value) -> Struct {
        to_struct(&value).unwrap_or_default()
    }

    #[test]
    fn a_context_converts_and_counts_as_its_json_does() {
        let input =
            json!({"customer_id": "c1", "items": [{"sku": "A-1", "qty": 2}], "note": "é\"\n"});
        let (first, second) = (json!({"order_id": 7}), json!({"charge": {"amount": 12.5}}));
        let context = Context::new(&input, [("create_order", &first), ("charge", &second)]);
        let as_json = serde_json::to_value(&context).unwrap_or_default();
        assert_eq!(
            as_json,
            json!({"input": input, "steps": {"create_order": first, "charge": second}})
        );
        assert_eq!(Some(context_struct(&context)), to_struct(&as_json));
        let written = serde_json::to_vec(&context).unwrap_or_default();
        assert_eq!(size_of(&context), written.len());
        assert_eq!(
            size_of(&Context::new(&Value::Null, [])),
            br#"{"input":null,"steps":{}}"#.len()
        );
    }

    fn number(value: f64) -> WireValue {
        WireValue {
            kind: Some(Kind::NumberValue(value)),
        }
    }

    fn with_field(key: &str, value: WireValue) -> Struct {
        Struct {
            fields: HashMap::from([(key.to_owned(), value)]),
        }
    }

    #[test]
    fn a_document_round_trips_and_whole_numbers_become_integers() {
        let document = json!({
            "customer_id": "c-1",
            "amount_cents": 1250,
            "rate": 0.25,
            "items": [{"sku": "a", "quantity": 2}, null, true],
            "nested": {"deeper": {"x": -3}},
        });
        let back = from_struct(&wire(document.clone()), "input");
        assert_eq!(back, Ok(document));
        let back = from_struct(&with_field("n", number(5.0)), "input");
        assert_eq!(
            back.map(|value| value.to_string()),
            Ok(r#"{"n":5}"#.to_owned())
        );
    }

    #[test]
    fn numbers_a_double_cannot_carry_exactly_are_refused_with_their_path() {
        assert!(from_struct(&with_field("n", number(MAX_EXACT_NUMBER)), "input").is_ok());
        assert!(from_struct(&with_field("n", number(-MAX_EXACT_NUMBER)), "input").is_ok());
        for bad in [
            9_223_372_036_854_775_807.0,
            -1e300,
            MAX_EXACT_NUMBER * 2.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let list = WireValue {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![number(1.0), number(bad)],
                })),
            };
            let error = from_struct(&with_field("amounts", list), "input");
            assert_eq!(
                error.map_err(|error| error.field),
                Err("input.amounts[1]".to_owned()),
                "{bad}"
            );
        }
        assert!(check(&json!({"n": 9_007_199_254_740_992_i64}), "output").is_ok());
        assert!(check(&json!({"n": 9_007_199_254_740_993_i64}), "output").is_err());
        assert!(check(&json!({"n": u64::MAX}), "output").is_err());
        assert!(check(&json!({"n": 1e300}), "output").is_err());
        assert!(check(&json!({"n": 0.5}), "output").is_ok());
    }

    #[test]
    fn a_nul_character_in_a_string_or_a_key_is_refused() {
        let error = from_struct(&wire(json!({"a": {"b": ["x", "y\u{0}"]}})), "input");
        assert_eq!(
            error.map_err(|error| error.field),
            Err("input.a.b[1]".to_owned())
        );
        let error = from_struct(&wire(json!({"a": {"k\u{0}": 1}})), "input");
        assert_eq!(
            error.map_err(|error| error.field),
            Err("input.a[\"k\\0\"]".to_owned())
        );
        assert!(check(&json!({"x": ["\u{0}"]}), "output").is_err());
        assert!(check(&json!({"\u{0}": 1}), "output").is_err());
    }

    #[test]
    fn a_value_with_no_kind_is_null_and_too_deep_a_document_is_refused() {
        let null = from_struct(&with_field("v", WireValue { kind: None }), "input");
        assert_eq!(null, Ok(json!({"v": null})));
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!([deep]);
        }
        assert!(check(&json!({"d": deep.clone()}), "output").is_err());
        assert!(from_struct(&wire(json!({"d": deep})), "input").is_err());
        let mut fine = json!(1);
        for _ in 0..MAX_DEPTH - 1 {
            fine = json!([fine]);
        }
        assert!(check(&json!({"d": fine.clone()}), "output").is_ok());
        assert!(from_struct(&wire(json!({"d": fine})), "input").is_ok());
    }

    #[test]
    fn any_stored_number_converts_back_to_the_wire() {
        let stored: Value =
            serde_json::from_str(r#"{"big": 9223372036854776000, "neg": -12, "f": 1.5}"#)
                .unwrap_or_default();
        let wire = to_struct(&stored).unwrap_or_default();
        assert_eq!(wire.fields.len(), 3);
        assert_eq!(to_struct(&json!(3)).map(|s| s.fields.len()), Some(1));
        assert_eq!(to_struct(&Value::Null), None);
    }

    #[test]
    fn sizes_and_shortened_echoes() {
        assert!(check_size(&json!({"a": "x".repeat(100)}), 1000, "input").is_ok());
        let error = check_size(&json!({"a": "x".repeat(2000)}), 1000, "input");
        assert_eq!(error.map_err(|error| error.field), Err("input".to_owned()));
        assert_eq!(shorten("abcdef", 3), "abc…");
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("äöüß", 2), "äö…");
    }
}
