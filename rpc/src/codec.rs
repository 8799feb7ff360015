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

    /// Decodes a value, failing with [`Error::Decode`] on malformed input.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        match self {
            Self::Postcard => postcard::from_bytes(bytes).map_err(|e| Error::Decode(e.to_string())),
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
}
