//! Payload codecs. The request header names the codec; the reply uses the same one.

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, Result};

/// How argument and reply payloads are encoded. Carried in every request header, so one server
/// answers clients that use different codecs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// postcard (compact, not self-describing). Wire value 0. The default.
    #[default]
    Postcard,
    /// JSON, for clients in other languages. Wire value 1.
    Json,
}

impl Codec {
    /// The wire value of this codec.
    pub fn to_wire(self) -> u8 {
        match self {
            Self::Postcard => 0,
            Self::Json => 1,
        }
    }

    /// The codec for a wire value, if known.
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Postcard),
            1 => Some(Self::Json),
            _ => None,
        }
    }

    /// Encodes a value.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes> {
        match self {
            Self::Postcard => postcard::to_allocvec(value)
                .map(Bytes::from)
                .map_err(|e| Error::Encode(e.to_string())),
            Self::Json => serde_json::to_vec(value)
                .map(Bytes::from)
                .map_err(|e| Error::Encode(e.to_string())),
        }
    }

    /// Appends the encoding of `value` to `buf`.
    pub(crate) fn encode_into<T: Serialize + ?Sized>(
        self,
        value: &T,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>> {
        match self {
            Self::Postcard => {
                postcard::to_extend(value, buf).map_err(|e| Error::Encode(e.to_string()))
            }
            Self::Json => {
                serde_json::to_writer(&mut buf, value).map_err(|e| Error::Encode(e.to_string()))?;
                Ok(buf)
            }
        }
    }

    /// Decodes a value, failing with [`Error::Decode`] on malformed input, including bytes left
    /// over after the value (postcard; JSON allows only trailing whitespace).
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        match self {
            Self::Postcard => {
                let (value, rest) =
                    postcard::take_from_bytes(bytes).map_err(|e| Error::Decode(e.to_string()))?;
                if !rest.is_empty() {
                    return Err(Error::Decode(format!(
                        "{} trailing bytes after the value",
                        rest.len()
                    )));
                }
                Ok(value)
            }
            Self::Json => serde_json::from_slice(bytes).map_err(|e| Error::Decode(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        for codec in [Codec::Postcard, Codec::Json] {
            let bytes = codec.encode(&(10u32, "x".to_string())).unwrap();
            let back: (u32, String) = codec.decode(&bytes).unwrap();
            assert_eq!(back, (10, "x".into()));
            assert_eq!(Codec::from_wire(codec.to_wire()), Some(codec));
            assert!(matches!(
                codec.decode::<(u32, String)>(&[0xff]),
                Err(Error::Decode(_))
            ));
        }
        assert_eq!(Codec::from_wire(9), None);
    }

    #[test]
    fn trailing_bytes_are_a_decode_error() {
        let mut bytes = Codec::Postcard.encode(&(10u32, 20u32)).unwrap().to_vec();
        bytes.push(0);
        assert!(matches!(
            Codec::Postcard.decode::<(u32, u32)>(&bytes),
            Err(Error::Decode(m)) if m.contains("trailing")
        ));
        assert!(Codec::Json.decode::<u32>(b"10 x").is_err());
        assert_eq!(Codec::Json.decode::<u32>(b"10 ").unwrap(), 10);
    }

    /// The JSON example of `docs/PROTOCOL.md`: serde's field names, as written.
    #[test]
    fn documented_json_payloads() {
        #[derive(serde::Serialize)]
        struct Args {
            a: i64,
            b: i64,
        }
        #[derive(serde::Serialize)]
        struct Reply {
            c: i64,
        }
        let args = Codec::Json.encode(&Args { a: 10, b: 20 }).unwrap();
        assert_eq!(&args[..], br#"{"a":10,"b":20}"#);
        let reply = Codec::Json.encode(&Reply { c: 200 }).unwrap();
        assert_eq!(&reply[..], br#"{"c":200}"#);
    }
}
