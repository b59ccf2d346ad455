//! How `skein consume` prints a record: `value`, `full`, `json`, or a kcat-style template.
//!
//! Template tokens: `%t` topic, `%p` partition, `%o` offset, `%k` key, `%v` value, `%h`
//! headers (`name=value` joined by `,`), `%T` timestamp (ms since the epoch), `%K` key length,
//! `%S` value length (−1 for a null key or value), `%%` a percent sign. Escapes: `\n`, `\t`,
//! `\r`, `\0`, `\\`. Keys and values are written as their raw bytes (binary-safe); a null one
//! prints nothing in a template and `(null)` in `value` and `full`.
//!
//! JSON: one object per line, `{"topic","partition","offset","timestamp","key","value",
//! "headers":[{"key","value"}]}`; null keys and values are `null`. Bytes are written per
//! `--encoding`: `utf8` (the default) as a string, falling back to base64 for bytes that are
//! not UTF-8 and saying so in `"key_encoding"` / `"value_encoding"` (`"base64"`); `base64` or
//! `hex` for every field.

use std::io::Write;

use base64::Engine;
use skein_client::ConsumerRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    Utf8,
    Base64,
    Hex,
}

/// A parsed `--format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Value,
    Full,
    Json(Encoding),
    Template(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(Vec<u8>),
    Topic,
    Partition,
    Offset,
    Key,
    Value,
    Headers,
    Timestamp,
    KeyLength,
    ValueLength,
}

impl Format {
    /// `value`, `full`, `json`, or a template (anything with a `%` or a `\` escape).
    pub fn parse(text: &str, encoding: Encoding) -> Result<Format, String> {
        match text {
            "value" => Ok(Format::Value),
            "full" => Ok(Format::Full),
            "json" => Ok(Format::Json(encoding)),
            template if template.contains('%') || template.contains('\\') => {
                parse_template(template).map(Format::Template)
            }
            other => {
                Err(format!("--format is value, full, json or a template with %-tokens (got {other:?})"))
            }
        }
    }

    /// Writes one record (with its line end, except for a template, which says its own).
    pub fn write(&self, out: &mut impl Write, record: &ConsumerRecord) -> std::io::Result<()> {
        match self {
            Format::Value => {
                write_or_null(out, &record.value)?;
                out.write_all(b"\n")
            }
            Format::Full => {
                write!(out, "{}\t{}\t{}\t", record.partition, record.offset, record.timestamp)?;
                write_or_null(out, &record.key)?;
                out.write_all(b"\t")?;
                write_or_null(out, &record.value)?;
                out.write_all(b"\n")
            }
            Format::Json(encoding) => {
                let line = json(record, *encoding);
                out.write_all(line.to_string().as_bytes())?;
                out.write_all(b"\n")
            }
            Format::Template(pieces) => {
                for piece in pieces {
                    match piece {
                        Piece::Text(text) => out.write_all(text)?,
                        Piece::Topic => out.write_all(record.topic.as_bytes())?,
                        Piece::Partition => write!(out, "{}", record.partition)?,
                        Piece::Offset => write!(out, "{}", record.offset)?,
                        Piece::Timestamp => write!(out, "{}", record.timestamp)?,
                        Piece::Key => out.write_all(record.key.as_deref().unwrap_or_default())?,
                        Piece::Value => out.write_all(record.value.as_deref().unwrap_or_default())?,
                        Piece::KeyLength => write!(out, "{}", length(&record.key))?,
                        Piece::ValueLength => write!(out, "{}", length(&record.value))?,
                        Piece::Headers => {
                            for (i, (name, value)) in record.headers.iter().enumerate() {
                                if i > 0 {
                                    out.write_all(b",")?;
                                }
                                out.write_all(name.as_bytes())?;
                                out.write_all(b"=")?;
                                out.write_all(value.as_deref().unwrap_or_default())?;
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

fn write_or_null(out: &mut impl Write, bytes: &Option<bytes::Bytes>) -> std::io::Result<()> {
    match bytes {
        Some(bytes) => out.write_all(bytes),
        None => out.write_all(b"(null)"),
    }
}

fn length(bytes: &Option<bytes::Bytes>) -> i64 {
    bytes.as_ref().map_or(-1, |b| b.len() as i64)
}

/// Turns `\n`, `\t`, `\r`, `\0` and `\\` into their bytes (also what `--delimiter` accepts).
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buffer = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
            continue;
        }
        out.push(match chars.next() {
            Some('n') => b'\n',
            Some('t') => b'\t',
            Some('r') => b'\r',
            Some('0') => 0,
            Some('\\') => b'\\',
            Some(other) => return Err(format!("unknown escape \\{other} (use \\n \\t \\r \\0 or \\\\)")),
            None => return Err("a trailing \\ escapes nothing".to_owned()),
        });
    }
    Ok(out)
}

fn parse_template(template: &str) -> Result<Vec<Piece>, String> {
    let bytes = unescape(template)?;
    let mut pieces = Vec::new();
    let mut text = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] != b'%' {
            text.push(bytes[at]);
            at += 1;
            continue;
        }
        let token = match bytes.get(at + 1) {
            Some(b'%') => {
                text.push(b'%');
                at += 2;
                continue;
            }
            Some(b't') => Piece::Topic,
            Some(b'p') => Piece::Partition,
            Some(b'o') => Piece::Offset,
            Some(b'k') => Piece::Key,
            Some(b'v') => Piece::Value,
            Some(b'h') => Piece::Headers,
            Some(b'T') => Piece::Timestamp,
            Some(b'K') => Piece::KeyLength,
            Some(b'S') => Piece::ValueLength,
            Some(&other) => {
                return Err(format!(
                    "unknown token %{} (use %t %p %o %k %v %h %T %K %S or %%)",
                    other as char
                ))
            }
            None => return Err("a trailing % names no token".to_owned()),
        };
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(token);
        at += 2;
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Bytes as JSON per the encoding: (value, the encoding used when it is not the asked one).
fn encoded(bytes: &[u8], encoding: Encoding) -> (serde_json::Value, Option<&'static str>) {
    match encoding {
        Encoding::Utf8 => match std::str::from_utf8(bytes) {
            Ok(text) => (serde_json::Value::String(text.to_owned()), None),
            Err(_) => (base64::engine::general_purpose::STANDARD.encode(bytes).into(), Some("base64")),
        },
        Encoding::Base64 => (base64::engine::general_purpose::STANDARD.encode(bytes).into(), None),
        Encoding::Hex => (bytes.iter().map(|b| format!("{b:02x}")).collect::<String>().into(), None),
    }
}

fn json(record: &ConsumerRecord, encoding: Encoding) -> serde_json::Value {
    use serde_json::{Map, Value};
    let mut object = Map::new();
    object.insert("topic".into(), (*record.topic).into());
    object.insert("partition".into(), record.partition.into());
    object.insert("offset".into(), record.offset.into());
    object.insert("timestamp".into(), record.timestamp.into());
    let field = |object: &mut Map<String, Value>, name: &str, bytes: &Option<bytes::Bytes>| match bytes {
        None => {
            object.insert(name.into(), Value::Null);
        }
        Some(bytes) => {
            let (value, fallback) = encoded(bytes, encoding);
            object.insert(name.into(), value);
            if let Some(used) = fallback {
                object.insert(format!("{name}_encoding"), used.into());
            }
        }
    };
    field(&mut object, "key", &record.key);
    field(&mut object, "value", &record.value);
    let headers: Vec<Value> = record
        .headers
        .iter()
        .map(|(name, value)| {
            let mut header = Map::new();
            header.insert("key".into(), name.clone().into());
            field(&mut header, "value", value);
            Value::Object(header)
        })
        .collect();
    object.insert("headers".into(), headers.into());
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ConsumerRecord {
        ConsumerRecord {
            topic: "orders".into(),
            partition: 3,
            offset: 42,
            timestamp: 1_700_000_000_123,
            key: Some(bytes::Bytes::from_static(b"alice")),
            value: Some(bytes::Bytes::from_static(b"order-1")),
            headers: vec![("source".into(), Some(bytes::Bytes::from_static(b"web"))), ("trace".into(), None)],
        }
    }

    fn written(format: &Format, record: &ConsumerRecord) -> Vec<u8> {
        let mut out = Vec::new();
        format.write(&mut out, record).unwrap();
        out
    }

    #[test]
    fn every_template_token_and_escape() {
        let format = Format::parse(r"%t|%p|%o|%k|%v|%h|%T|%K|%S|%%\t\n", Encoding::Utf8).unwrap();
        let out = written(&format, &record());
        assert_eq!(out, b"orders|3|42|alice|order-1|source=web,trace=|1700000000123|5|7|%\t\n");
        let mut null = record();
        null.key = None;
        null.value = None;
        assert_eq!(written(&Format::parse("%k:%v:%K:%S", Encoding::Utf8).unwrap(), &null), b"::-1:-1");
        assert!(Format::parse("%x", Encoding::Utf8).unwrap_err().contains("%x"));
        assert!(Format::parse("abc%", Encoding::Utf8).is_err());
        assert!(Format::parse(r"\q%v", Encoding::Utf8).is_err());
        assert!(Format::parse("plain", Encoding::Utf8).is_err());
    }

    #[test]
    fn binary_values_are_written_as_they_are() {
        let mut binary = record();
        binary.value = Some(bytes::Bytes::from_static(&[0, 159, 255, b'\n']));
        assert_eq!(written(&Format::Value, &binary), [0, 159, 255, b'\n', b'\n']);
        assert_eq!(written(&Format::parse("%v", Encoding::Utf8).unwrap(), &binary), [0, 159, 255, b'\n']);
    }

    #[test]
    fn json_objects_with_each_encoding() {
        let out = written(&Format::Json(Encoding::Utf8), &record());
        let object: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(object["topic"], "orders");
        assert_eq!(object["partition"], 3);
        assert_eq!(object["offset"], 42);
        assert_eq!(object["timestamp"], 1_700_000_000_123i64);
        assert_eq!(object["key"], "alice");
        assert_eq!(object["value"], "order-1");
        assert_eq!(object["headers"][0]["key"], "source");
        assert_eq!(object["headers"][0]["value"], "web");
        assert!(object["headers"][1]["value"].is_null());
        assert!(object.get("value_encoding").is_none());

        let mut binary = record();
        binary.value = Some(bytes::Bytes::from_static(&[0xff, 0x00, 0x10]));
        binary.key = None;
        let object: serde_json::Value =
            serde_json::from_slice(&written(&Format::Json(Encoding::Utf8), &binary)).unwrap();
        assert_eq!(object["value"], "/wAQ");
        assert_eq!(object["value_encoding"], "base64");
        assert!(object["key"].is_null());
        let object: serde_json::Value =
            serde_json::from_slice(&written(&Format::Json(Encoding::Hex), &binary)).unwrap();
        assert_eq!(object["value"], "ff0010");
        let object: serde_json::Value =
            serde_json::from_slice(&written(&Format::Json(Encoding::Base64), &record())).unwrap();
        assert_eq!(object["value"], "b3JkZXItMQ==");
    }
}
