//! What `skein produce` reads (records split by a delimiter, binary-safe, keys split off by a
//! separator, headers) and how `--from` names a starting point.

use std::io::BufRead;
use std::time::{SystemTime, UNIX_EPOCH};

use skein_client::SeekTo;

/// Splits a byte stream into records at `delimiter` (any bytes, at least one). The last
/// record needs no delimiter after it; an empty input gives no record. Bytes are kept as they
/// are: no UTF-8 requirement.
pub struct Records<R> {
    reader: R,
    delimiter: Vec<u8>,
    done: bool,
}

impl<R: BufRead> Records<R> {
    pub fn new(reader: R, delimiter: Vec<u8>) -> Records<R> {
        assert!(!delimiter.is_empty(), "checked by the caller");
        Records { reader, delimiter, done: false }
    }
}

impl<R: BufRead> Iterator for Records<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let last = *self.delimiter.last().expect("not empty");
        let mut record = Vec::new();
        loop {
            match self.reader.read_until(last, &mut record) {
                Err(error) => return Some(Err(error)),
                Ok(0) => {
                    self.done = true;
                    return (!record.is_empty()).then_some(Ok(record));
                }
                Ok(_) => {
                    if record.ends_with(&self.delimiter) {
                        record.truncate(record.len() - self.delimiter.len());
                        return Some(Ok(record));
                    }
                }
            }
        }
    }
}

/// Splits `record` at the first `separator` into (key, value); `None` when it has none.
pub fn split_key(record: &[u8], separator: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    if separator.is_empty() {
        return None;
    }
    let at = record.windows(separator.len()).position(|w| w == separator)?;
    Some((record[..at].to_vec(), record[at + separator.len()..].to_vec()))
}

/// `name=value` (value may be empty or contain `=`).
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("a header is NAME=VALUE, got {text:?}")),
    }
}

/// Where `skein consume` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Seek(SeekTo),
    /// The last N records of each partition (`-N`).
    Last(u64),
}

/// `beginning`/`earliest`, `end`/`latest`, an offset, `-N` (the last N per partition),
/// `time:EPOCH_MS`, `time:RFC3339` (`time:2026-12-01T10:00:00Z`) or `time:-DURATION`
/// (`time:-1h`, `time:-90s`, `time:-2d`, relative to now).
pub fn parse_start(text: &str) -> Result<StartAt, String> {
    parse_start_at(text, SystemTime::now())
}

fn parse_start_at(text: &str, now: SystemTime) -> Result<StartAt, String> {
    match text {
        "beginning" | "earliest" => return Ok(StartAt::Seek(SeekTo::Beginning)),
        "end" | "latest" => return Ok(StartAt::Seek(SeekTo::End)),
        _ => {}
    }
    if let Some(count) = text.strip_prefix('-') {
        return count
            .parse()
            .map(StartAt::Last)
            .map_err(|_| format!("-N is the last N records of each partition, got {text:?}"));
    }
    let Some(time) = text.strip_prefix("time:") else {
        return text.parse().map(|o| StartAt::Seek(SeekTo::Offset(o))).map_err(|_| {
            format!(
                "expected beginning, end, OFFSET, -N, time:EPOCH_MS, time:RFC3339 or time:-1h, got {text:?}"
            )
        });
    };
    let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let at = if let Some(ago) = time.strip_prefix('-') {
        let ago = humantime::parse_duration(ago).map_err(|e| format!("time:-DURATION ({ago:?}): {e}"))?;
        ms(now.checked_sub(ago).unwrap_or(UNIX_EPOCH))
    } else if let Ok(epoch_ms) = time.parse::<i64>() {
        epoch_ms
    } else {
        ms(humantime::parse_rfc3339_weak(time)
            .map_err(|e| format!("time:{time}: {e} (RFC 3339, e.g. 2026-12-01T10:00:00Z)"))?)
    };
    Ok(StartAt::Seek(SeekTo::Timestamp(at)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn split(input: &[u8], delimiter: &[u8]) -> Vec<Vec<u8>> {
        Records::new(input, delimiter.to_vec()).map(Result::unwrap).collect()
    }

    #[test]
    fn records_split_at_any_delimiter_and_keep_binary_bytes() {
        assert_eq!(split(b"a\nb\n", b"\n"), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(split(b"a\nb", b"\n"), vec![b"a".to_vec(), b"b".to_vec()], "no delimiter after the last");
        assert_eq!(
            split(b"a\n\nb\n", b"\n"),
            vec![b"a".to_vec(), Vec::new(), b"b".to_vec()],
            "empty records kept"
        );
        assert_eq!(split(b"", b"\n"), Vec::<Vec<u8>>::new());
        assert_eq!(split(b"x||y|z||", b"||"), vec![b"x".to_vec(), b"y|z".to_vec()]);
        assert_eq!(split(&[0xff, 0, 0xfe, 0, 7], &[0]), vec![vec![0xff], vec![0xfe], vec![7]]);
    }

    #[test]
    fn keys_and_headers() {
        assert_eq!(split_key(b"alice:order:1", b":"), Some((b"alice".to_vec(), b"order:1".to_vec())));
        assert_eq!(split_key(b"no separator", b":"), None);
        assert_eq!(parse_header("trace=a=b").unwrap(), ("trace".into(), "a=b".into()));
        assert_eq!(parse_header("empty=").unwrap(), ("empty".into(), String::new()));
        assert!(parse_header("=x").is_err());
        assert!(parse_header("novalue").is_err());
    }

    #[test]
    fn starting_points() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let at = |text| parse_start_at(text, now).unwrap();
        assert_eq!(at("beginning"), StartAt::Seek(SeekTo::Beginning));
        assert_eq!(at("latest"), StartAt::Seek(SeekTo::End));
        assert_eq!(at("17"), StartAt::Seek(SeekTo::Offset(17)));
        assert_eq!(at("-5"), StartAt::Last(5));
        assert_eq!(at("time:1700000000000"), StartAt::Seek(SeekTo::Timestamp(1_700_000_000_000)));
        assert_eq!(at("time:-1h"), StartAt::Seek(SeekTo::Timestamp((10_000 - 3600) * 1000)));
        assert_eq!(at("time:-90s"), StartAt::Seek(SeekTo::Timestamp((10_000 - 90) * 1000)));
        assert_eq!(at("time:2023-11-14T22:13:20Z"), StartAt::Seek(SeekTo::Timestamp(1_700_000_000_000)));
        assert!(parse_start_at("time:yesterday", now).is_err());
        assert!(parse_start_at("-x", now).is_err());
        assert!(parse_start_at("soon", now).is_err());
    }
}
