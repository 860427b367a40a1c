//! Serde `with` modules for lists of byte strings: keys of `get_all`, entries of `put_all`, the
//! values and keys that replies carry.
//!
//! Without them serde writes every byte as one element of a sequence, which postcard encodes
//! exactly like a byte string (a varint length, then the bytes) but one call at a time: a 2 MB
//! `put_all` took tens of milliseconds to encode and twice that to decode in a debug build, on
//! every hop (client, leader, every follower's log). These modules write and read each byte
//! string in one piece; the bytes on the wire and in the log are unchanged (see the tests).

use serde::de::Deserializer;
use serde::ser::Serializer;
use serde::Deserialize;
use serde_bytes::{ByteBuf, Bytes};

/// `Vec<Vec<u8>>`: a list of keys.
pub mod list {
    use super::*;

    pub fn serialize<S: Serializer>(items: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|b| Bytes::new(b)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let bufs = Vec::<ByteBuf>::deserialize(d)?;
        Ok(bufs.into_iter().map(ByteBuf::into_vec).collect())
    }
}

/// `Vec<Option<Vec<u8>>>`: values in request order, absent ones as `None`.
pub mod optional_list {
    use super::*;

    pub fn serialize<S: Serializer>(items: &[Option<Vec<u8>>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|b| b.as_deref().map(Bytes::new)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Option<Vec<u8>>>, D::Error> {
        let bufs = Vec::<Option<ByteBuf>>::deserialize(d)?;
        Ok(bufs.into_iter().map(|b| b.map(ByteBuf::into_vec)).collect())
    }
}

/// `Vec<(Vec<u8>, Vec<u8>)>`: key and value pairs.
pub mod pairs {
    use super::*;

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    pub fn serialize<S: Serializer>(items: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|(k, v)| (Bytes::new(k), Bytes::new(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Pairs, D::Error> {
        let bufs = Vec::<(ByteBuf, ByteBuf)>::deserialize(d)?;
        Ok(bufs.into_iter().map(|(k, v)| (k.into_vec(), v.into_vec())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct AsSeq {
        keys: Vec<Vec<u8>>,
        values: Vec<Option<Vec<u8>>>,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct AsBytes {
        #[serde(with = "list")]
        keys: Vec<Vec<u8>>,
        #[serde(with = "optional_list")]
        values: Vec<Option<Vec<u8>>>,
        #[serde(with = "pairs")]
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    }

    fn sample() -> AsSeq {
        let long: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        AsSeq {
            keys: vec![vec![], b"k".to_vec(), long.clone()],
            values: vec![None, Some(vec![]), Some(long.clone())],
            entries: vec![(b"a".to_vec(), vec![]), (long.clone(), long)],
        }
    }

    /// The log and peers of an older version wrote these fields as sequences of u8: the bytes
    /// must be the same both ways, or a format-1 log would no longer read.
    #[test]
    fn same_bytes_as_sequences_of_u8() {
        let seq = sample();
        let wire = postcard::to_allocvec(&seq).unwrap();
        let bytes = AsBytes {
            keys: seq.keys.clone(),
            values: seq.values.clone(),
            entries: seq.entries.clone(),
        };
        assert_eq!(postcard::to_allocvec(&bytes).unwrap(), wire);
        assert_eq!(postcard::from_bytes::<AsBytes>(&wire).unwrap(), bytes);
        let back: AsSeq = postcard::from_bytes(&postcard::to_allocvec(&bytes).unwrap()).unwrap();
        assert_eq!(back, seq);
    }

    #[test]
    fn json_round_trip() {
        let s = sample();
        let bytes = AsBytes {
            keys: s.keys,
            values: s.values,
            entries: s.entries,
        };
        let json = serde_json::to_string(&bytes).unwrap();
        assert_eq!(serde_json::from_str::<AsBytes>(&json).unwrap(), bytes);
    }
}
