//! Keys and values (bytes) in JSON answers: a string when the bytes are UTF-8, else
//! `{"hex": "..."}`. Never a lossy string: a value written by another client in binary comes back
//! as exactly its bytes, not with replacement characters.

use serde_json::{json, Value};

/// `bytes` as a JSON string, or as `{"hex": ...}` when they are not UTF-8.
pub fn to_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_string()),
        Err(_) => json!({ "hex": bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_text_and_binary_is_hex() {
        assert_eq!(to_json(b"caf\xc3\xa9"), json!("café"));
        assert_eq!(to_json(&[0xff, 0x00, 0x41]), json!({"hex": "ff0041"}));
        assert_eq!(to_json(b""), json!(""));
    }
}
