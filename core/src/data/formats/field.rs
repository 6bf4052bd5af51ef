//! The text field of a JSON line, found in one pass: the path's keys are compared as the
//! parser meets them, every other value is skipped without being built, and only the
//! text itself is allocated.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What is at the end of a path.
enum Found {
    Text(String),
    /// Not a string: what it is.
    Other(&'static str),
    /// Path segment `usize` is missing.
    Missing(usize),
    /// The value before path segment `usize` is not an object: what it is.
    NotObject(usize, &'static str),
}

/// The value at `path[depth..]` of the value being parsed.
struct At<'p> {
    path: &'p [&'p str],
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for At<'_> {
    type Value = Found;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        d.deserialize_any(self)
    }
}

/// Whether a key is the one sought, compared without allocating.
struct KeyIs<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

impl At<'_> {
    fn leaf(&self) -> bool {
        self.depth == self.path.len()
    }

    /// What a value that is not a string or an object is.
    fn other(&self, what: &'static str) -> Found {
        if self.leaf() {
            Found::Other(what)
        } else {
            Found::NotObject(self.depth, what)
        }
    }
}

impl<'de> Visitor<'de> for At<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<Found, E> {
        Ok(self.visit_string_value(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Found, E> {
        Ok(self.visit_string_value(v))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Found, E> {
        Ok(self.other("a boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Found, E> {
        Ok(self.other("a number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Found, E> {
        Ok(self.other("a number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Found, E> {
        Ok(self.other("a number"))
    }

    fn visit_unit<E>(self) -> Result<Found, E> {
        Ok(self.other("null"))
    }

    fn visit_none<E>(self) -> Result<Found, E> {
        Ok(self.other("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.other("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        if self.leaf() {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Found::Other("an object"));
        }
        let mut found = Found::Missing(self.depth);
        while let Some(hit) = map.next_key_seed(KeyIs(self.path[self.depth]))? {
            if hit {
                // The last of repeated keys, as most JSON readers keep.
                found = map.next_value_seed(At {
                    path: self.path,
                    depth: self.depth + 1,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

impl At<'_> {
    fn visit_string_value(&self, v: String) -> Found {
        if self.leaf() {
            Found::Text(v)
        } else {
            Found::NotObject(self.depth, "a string")
        }
    }
}

/// The string at `path` (a dotted field path, split) of one JSON line, or why there is
/// none.
pub(crate) fn field_text(line: &[u8], path: &[&str]) -> Result<String, String> {
    let mut de = serde_json::Deserializer::from_slice(line);
    let found = At { path, depth: 0 }
        .deserialize(&mut de)
        .and_then(|f| de.end().map(|()| f))
        .map_err(|e| format!("not JSON ({e})"))?;
    let name = |k: usize| path[..k].join(".");
    match found {
        Found::Text(t) => Ok(t),
        Found::Other(what) => Err(format!(
            "field {:?} is {what}, not a string",
            name(path.len())
        )),
        Found::Missing(k) => Err(format!("no field {:?}", name(k + 1))),
        Found::NotObject(0, what) => Err(format!("the record is {what}, not a JSON object")),
        Found::NotObject(k, what) => Err(format!("field {:?} is {what}, not an object", name(k))),
    }
}

#[cfg(test)]
mod tests {
    use super::field_text;

    #[test]
    fn finds_the_field_or_says_why_not() {
        let t = |line: &str, path: &str| {
            field_text(line.as_bytes(), &path.split('.').collect::<Vec<_>>())
        };
        assert_eq!(
            t(
                r#"{"id": 1, "text": "a\nb \u00e9", "x": [1, {"text": 2}]}"#,
                "text"
            ),
            Ok("a\nb é".into())
        );
        assert_eq!(
            t(
                r#"{"meta": {"body": "deep", "n": null}, "text": 3}"#,
                "meta.body"
            ),
            Ok("deep".into())
        );
        assert_eq!(
            t(r#"{"text": "first", "text": "last"}"#, "text"),
            Ok("last".into())
        );
        assert_eq!(t(r#"{"id": 3}"#, "text").unwrap_err(), "no field \"text\"");
        assert_eq!(
            t(r#"{"meta": {}}"#, "meta.body").unwrap_err(),
            "no field \"meta.body\""
        );
        assert_eq!(
            t(r#"{"text": null}"#, "text").unwrap_err(),
            "field \"text\" is null, not a string"
        );
        assert_eq!(
            t(r#"{"text": [1]}"#, "text").unwrap_err(),
            "field \"text\" is an array, not a string"
        );
        assert_eq!(
            t(r#"{"meta": 5}"#, "meta.body").unwrap_err(),
            "field \"meta\" is a number, not an object"
        );
        assert_eq!(
            t(r#"[1, 2]"#, "text").unwrap_err(),
            "the record is an array, not a JSON object"
        );
        assert!(
            t(r#"{"text": "a""#, "text")
                .unwrap_err()
                .starts_with("not JSON")
        );
        assert!(
            t(r#"{"text": "a"} trailing"#, "text")
                .unwrap_err()
                .starts_with("not JSON")
        );
        assert!(
            t("{\"text\": \"\\ud800\"}", "text")
                .unwrap_err()
                .starts_with("not JSON")
        );
    }
}
