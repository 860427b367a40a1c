//! RESP framing: requests parsed with bounds checked before anything is buffered, replies encoded
//! as RESP2 or RESP3.
//!
//! Hand-written rather than taken from a crate: a server needs only the request half of the
//! protocol (arrays of bulk strings, and inline commands), and it must refuse a `*99999999` or
//! `$4000000000` header at once, before waiting for or allocating what it announces; the reply
//! half is a dozen shapes. The crates we looked at (`redis-protocol`, `resp`) decode whole frames
//! of any type into their own values first, which gives the bounds to the crate, not to us.

use bytes::{Buf, BytesMut};

/// Longest inline command (Redis' own limit).
pub const LINE_BYTES_MAX: usize = 64 * 1024;

/// Longest `*N` or `$N` header line: a sign, 19 digits and CRLF fit.
pub const HEADER_LINE_BYTES_MAX: usize = 24;

/// Bounds before a connection authenticated, as Redis 7 has them: at most 10 arguments and 16 KiB
/// in all.
pub const UNAUTHENTICATED_LIMITS: RequestLimits = RequestLimits {
    args_max: 10,
    bytes_max: 16 * 1024,
};

/// Bounds on one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Most arguments (the command's name counts).
    pub args_max: usize,
    /// Most bytes in all arguments together.
    pub bytes_max: usize,
}

/// A request the connection cannot go on after: the client is told, then the connection closes
/// (as Redis does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn protocol(what: &str) -> ProtocolError {
    ProtocolError(what.to_string())
}

/// How far a multibulk request at the front of the buffer has been read: what
/// [`parse_request`] keeps between calls while the request is incomplete.
#[derive(Debug, Default)]
pub struct Partial {
    /// Arguments announced.
    count: usize,
    /// Where each argument read so far lies in the buffer.
    spans: Vec<(usize, usize)>,
    /// Where the next header starts.
    at: usize,
    /// Bytes of the arguments read so far.
    total: usize,
}

/// Takes one complete request off the front of `buf`: `Ok(None)` when more bytes are needed, an
/// empty list for an empty inline line or `*0`/`*-1` (ignored, as Redis does). `partial` keeps
/// how far an incomplete request was read (the caller keeps it with the buffer, `None` at first),
/// so a request that arrives in many pieces is read once, not from its start at every piece.
pub fn parse_request(
    buf: &mut BytesMut,
    limits: RequestLimits,
    partial: &mut Option<Partial>,
) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != b'*' {
        *partial = None;
        return parse_inline(buf, limits);
    }
    let mut state = match partial.take() {
        Some(p) => p,
        None => {
            let Some((count, at)) = header(buf, 0, b'*', "invalid multibulk length")? else {
                return Ok(None);
            };
            if count <= 0 {
                buf.advance(at);
                return Ok(Some(Vec::new()));
            }
            if count as usize > limits.args_max {
                return Err(protocol("invalid multibulk length"));
            }
            Partial {
                count: count as usize,
                spans: Vec::with_capacity((count as usize).min(1024)),
                at,
                total: 0,
            }
        }
    };
    match read_arguments(buf, limits, &mut state)? {
        true => {
            let args = state.spans.iter().map(|&(s, e)| buf[s..e].to_vec()).collect();
            buf.advance(state.at);
            Ok(Some(args))
        }
        false => {
            *partial = Some(state);
            Ok(None)
        }
    }
}

/// Reads the arguments of a multibulk request that are complete in `buf`, from where `state`
/// stopped; whether all are. Nothing is copied until they are.
fn read_arguments(buf: &BytesMut, limits: RequestLimits, state: &mut Partial) -> Result<bool, ProtocolError> {
    let Partial {
        count,
        spans,
        at,
        total,
    } = state;
    while spans.len() < *count {
        if *at >= buf.len() {
            return Ok(false);
        }
        if buf[*at] != b'$' {
            return Err(ProtocolError(format!("expected '$', got '{}'", buf[*at] as char)));
        }
        let Some((len, body)) = header(buf, *at, b'$', "invalid bulk length")? else {
            return Ok(false);
        };
        if len < 0 {
            return Err(protocol("invalid bulk length"));
        }
        let len = len as usize;
        if total.saturating_add(len) > limits.bytes_max {
            return Err(ProtocolError(format!(
                "request larger than the limit of {} bytes",
                limits.bytes_max
            )));
        }
        let end = body + len;
        if buf.len() < end + 2 {
            return Ok(false);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(protocol("bulk string not followed by CRLF"));
        }
        *total += len;
        spans.push((body, end));
        *at = end + 2;
    }
    Ok(true)
}

/// A `*N\r\n` or `$N\r\n` header at `at`: the number and where what follows starts.
fn header(buf: &[u8], at: usize, kind: u8, invalid: &str) -> Result<Option<(i64, usize)>, ProtocolError> {
    debug_assert_eq!(buf[at], kind);
    let rest = &buf[at + 1..];
    let Some(nl) = rest.iter().take(HEADER_LINE_BYTES_MAX).position(|&b| b == b'\n') else {
        if rest.len() >= HEADER_LINE_BYTES_MAX {
            return Err(protocol(if kind == b'*' {
                "too big mbulk count string"
            } else {
                "too big bulk count string"
            }));
        }
        return Ok(None);
    };
    let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
    let n = std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| protocol(invalid))?;
    Ok(Some((n, at + 1 + nl + 1)))
}

/// An inline command: a line of words split on spaces, `"..."` and `'...'` quoting as redis-cli
/// and telnet users type them.
fn parse_inline(buf: &mut BytesMut, limits: RequestLimits) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
    let Some(nl) = buf.iter().take(LINE_BYTES_MAX).position(|&b| b == b'\n') else {
        if buf.len() >= LINE_BYTES_MAX {
            return Err(protocol("too big inline request"));
        }
        return Ok(None);
    };
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]).to_vec();
    buf.advance(nl + 1);
    let args = split_words(&line).ok_or_else(|| protocol("unbalanced quotes in request"))?;
    if args.len() > limits.args_max {
        return Err(protocol("invalid multibulk length"));
    }
    Ok(Some(args))
}

/// Splits a line into words; `None` for unbalanced quotes.
fn split_words(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut words = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let mut word = Vec::new();
        match line[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    let &b = line.get(i)?;
                    i += 1;
                    match b {
                        b'\\' if q == b'"' => {
                            let &e = line.get(i)?;
                            i += 1;
                            word.push(match e {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                other => other,
                            });
                        }
                        b if b == q => break,
                        b => word.push(b),
                    }
                }
                if line.get(i).is_some_and(|b| !b.is_ascii_whitespace()) {
                    return None;
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    word.push(line[i]);
                    i += 1;
                }
            }
        }
        words.push(word);
    }
    Some(words)
}

/// A reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `+text`.
    Simple(String),
    /// `-CODE text`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` bytes.
    Bulk(Vec<u8>),
    /// RESP3 `_`; RESP2 a null bulk string.
    Null,
    /// RESP3 `_`; RESP2 a null array (`*-1`).
    NullArray,
    /// `*n` items.
    Array(Vec<Value>),
    /// RESP3 `%n` pairs; RESP2 an array of 2n items.
    Map(Vec<(Value, Value)>),
    /// RESP3 `=n txt:`; RESP2 a bulk string (INFO, CLIENT INFO).
    Text(String),
}

impl Value {
    /// `+OK`.
    pub fn ok() -> Value {
        Value::Simple("OK".into())
    }

    /// An error; `text` starts with its code (`ERR ...`, `MOVED ...`).
    pub fn err(text: impl Into<String>) -> Value {
        Value::Error(text.into())
    }

    /// A bulk string or null.
    pub fn bulk_or_null(v: Option<Vec<u8>>) -> Value {
        v.map_or(Value::Null, Value::Bulk)
    }

    /// A bulk string of text.
    pub fn text(s: impl Into<String>) -> Value {
        Value::Bulk(s.into().into_bytes())
    }

    /// Appends the encoding to `out`, in RESP3 when `resp3`.
    pub fn encode(&self, resp3: bool, out: &mut Vec<u8>) {
        use std::io::Write;
        match self {
            Value::Simple(s) => {
                out.push(b'+');
                push_line(out, s);
            }
            Value::Error(s) => {
                out.push(b'-');
                push_line(out, s);
            }
            Value::Int(n) => {
                let _ = write!(out, ":{n}\r\n");
            }
            Value::Bulk(b) => {
                let _ = write!(out, "${}\r\n", b.len());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::Null | Value::NullArray if resp3 => out.extend_from_slice(b"_\r\n"),
            Value::Null => out.extend_from_slice(b"$-1\r\n"),
            Value::NullArray => out.extend_from_slice(b"*-1\r\n"),
            Value::Array(items) => {
                let _ = write!(out, "*{}\r\n", items.len());
                for item in items {
                    item.encode(resp3, out);
                }
            }
            Value::Map(pairs) => {
                if resp3 {
                    let _ = write!(out, "%{}\r\n", pairs.len());
                } else {
                    let _ = write!(out, "*{}\r\n", pairs.len() * 2);
                }
                for (k, v) in pairs {
                    k.encode(resp3, out);
                    v.encode(resp3, out);
                }
            }
            Value::Text(s) if resp3 => {
                let _ = write!(out, "={}\r\ntxt:", s.len() + 4);
                out.extend_from_slice(s.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Value::Text(s) => Value::Bulk(s.clone().into_bytes()).encode(false, out),
        }
    }
}

/// A simple string or error line: CR and LF would end it early, so they become spaces.
fn push_line(out: &mut Vec<u8>, s: &str) {
    out.extend(s.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        args_max: 8,
        bytes_max: 32,
    };

    fn parse(bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        parse_request(&mut BytesMut::from(bytes), LIMITS, &mut None)
    }

    fn words(ws: &[&str]) -> Vec<Vec<u8>> {
        ws.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn requests_parse_whole_or_wait() {
        let full = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse(full), Ok(Some(words(&["GET", "k"]))));
        let mut two = BytesMut::from(&b"*1\r\n$4\r\nPING\r\nPING\r\n"[..]);
        assert_eq!(parse_request(&mut two, LIMITS, &mut None), Ok(Some(words(&["PING"]))));
        assert_eq!(parse_request(&mut two, LIMITS, &mut None), Ok(Some(words(&["PING"]))));
        assert!(two.is_empty());
        assert_eq!(
            parse(b"set k \"a b\\n\" 'c d'\r\n"),
            Ok(Some(words(&["set", "k", "a b\n", "c d"])))
        );
        assert_eq!(parse(b"\r\n"), Ok(Some(Vec::new())));
    }

    #[test]
    fn bounds_are_checked_before_waiting_for_the_bytes() {
        assert!(parse(b"*9\r\n").is_err(), "more arguments than allowed");
        assert!(parse(b"*1\r\n$33\r\n").is_err(), "more bytes than allowed");
        assert!(parse(b"*1\r\n$-5\r\n").is_err());
        assert!(parse(b"*x\r\n").is_err());
        assert!(parse(b"*1\r\n+PING\r\n").is_err());
        assert!(parse(b"*1\r\n$4\r\nPINGxx").is_err());
        assert!(parse(b"get \"open\r\n").is_err());
        assert!(parse(&vec![b'a'; LINE_BYTES_MAX + 1]).is_err());
    }

    #[test]
    fn a_request_in_pieces_is_read_once_with_the_same_result() {
        let full = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        let mut buf = BytesMut::new();
        let mut partial = None;
        let mut got = Vec::new();
        for b in full {
            buf.extend_from_slice(&[*b]);
            while let Some(args) = parse_request(&mut buf, LIMITS, &mut partial).unwrap() {
                got.push(args);
            }
        }
        assert_eq!(got, vec![words(&["SET", "k", "hello"]), words(&["PING"])]);
        assert!(buf.is_empty() && partial.is_none());
    }

    #[test]
    fn header_lines_are_short_and_unauthenticated_requests_small() {
        // Leading zeros cannot stretch a header: the line is bounded, not just its value.
        let long = format!("*1\r\n${}1\r\n", "0".repeat(HEADER_LINE_BYTES_MAX));
        assert!(parse(long.as_bytes()).is_err());
        assert!(parse(format!("*{}1\r\n", "0".repeat(HEADER_LINE_BYTES_MAX)).as_bytes()).is_err());
        let unauth = |bytes: &[u8]| parse_request(&mut BytesMut::from(bytes), UNAUTHENTICATED_LIMITS, &mut None);
        assert!(unauth(b"*11\r\n").is_err(), "at most 10 arguments before AUTH");
        assert!(
            unauth(b"*2\r\n$4\r\nAUTH\r\n$16385\r\n").is_err(),
            "at most 16 KiB before AUTH"
        );
        assert_eq!(
            unauth(b"*2\r\n$4\r\nAUTH\r\n$1\r\nx\r\n"),
            Ok(Some(words(&["AUTH", "x"])))
        );
    }

    #[test]
    fn replies_encode_in_both_protocols() {
        let enc = |v: &Value, resp3| {
            let mut out = Vec::new();
            v.encode(resp3, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(enc(&Value::Null, false), "$-1\r\n");
        assert_eq!(enc(&Value::NullArray, false), "*-1\r\n");
        assert_eq!(enc(&Value::Null, true), "_\r\n");
        let map = Value::Map(vec![(Value::text("a"), Value::Int(1))]);
        assert_eq!(enc(&map, false), "*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(&map, true), "%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(&Value::Text("x".into()), true), "=5\r\ntxt:x\r\n");
        assert_eq!(enc(&Value::err("ERR a\r\nb"), false), "-ERR a  b\r\n");
    }
}
