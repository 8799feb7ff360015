//! Wire protocol v1 and v2: frames, headers and every numeric code. `docs/PROTOCOL.md` is the
//! prose version of this file; keep both in step.
//!
//! ```text
//! frame  := kind:u8  header_len:u32 (big-endian)  header:[header_len bytes, postcard]  payload:[.. end of stream]
//! record := 0x05  header_len:u32  header:[header_len bytes]  payload_len:u32  payload:[payload_len bytes]   (v2)
//! ```
//!
//! A leaf: it knows the bytes and the codes, and depends on nothing else in the crate but the
//! [`Metadata`] value type. Its errors ([`FrameError`]) turn into [`crate::Error`] in `error.rs`.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::metadata::Metadata;

/// The ALPN protocol identifier of wire protocol v1.
pub const ALPN: &[u8] = b"quicx/1";

/// The ALPN protocol identifier of wire protocol v2: v1 plus durable streams (many durable
/// messages on one stream, acknowledged cumulatively). quicx servers and clients offer both,
/// v2 first; a peer that speaks only v1 gets v1.
pub const ALPN_V2: &[u8] = b"quicx/2";

/// What quicx offers at the handshake, most preferred first.
pub(crate) fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![ALPN_V2.to_vec(), ALPN.to_vec()]
}

/// Bytes before a record's payload length ends: the frame prefix, then (after the header) 4.
pub(crate) const RECORD_LEN_BYTES: usize = 4;

/// Bytes before the header: kind (1) and header length (4).
pub(crate) const PREFIX_LEN: usize = 5;

/// Frame kinds: the first byte of every stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FrameKind {
    /// A call (client to server, or server to client for a reverse call).
    Request = 0x01,
    /// The reply to a request, or to a push that asked for a receipt, or to a hello.
    Response = 0x02,
    /// A server push: on a unidirectional stream, or on a bidirectional one when a receipt is
    /// wanted.
    Push = 0x03,
    /// A client declaring its identity right after connecting.
    Hello = 0x04,
    /// A durable message on a durable stream (v2): length-delimited, many per stream.
    Durable = 0x05,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::Request,
            0x02 => Self::Response,
            0x03 => Self::Push,
            0x04 => Self::Hello,
            0x05 => Self::Durable,
            _ => return None,
        })
    }
}

/// Request flags.
pub(crate) mod flags {
    /// The caller expects no response; the server finishes its send half with no data.
    pub(crate) const ONEWAY: u8 = 0x01;
    /// Every bit this version defines; a request with any other bit set is malformed.
    pub(crate) const KNOWN: u8 = ONEWAY;
}

/// A stream error code, sent in QUIC `RESET_STREAM` and `STOP_SENDING` frames (listed in
/// `docs/PROTOCOL.md`, section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamCode(u32);

impl StreamCode {
    /// The caller gave up (timeout, dropped future), or a frame did not arrive within the frame
    /// timeout. The handler is cancelled.
    pub const CANCELLED: Self = Self(0x01);
    /// The frame could not be parsed (unknown kind, truncated, undecodable header, reserved
    /// flag bits, trailing bytes after a header).
    pub const MALFORMED_FRAME: Self = Self(0x02);
    /// The header length is above the receiver's limit.
    pub const HEADER_TOO_LARGE: Self = Self(0x03);
    /// The payload is above the receiver's limit.
    pub const PAYLOAD_TOO_LARGE: Self = Self(0x04);
    /// Refused because the receiver is shutting down.
    pub const SHUTTING_DOWN: Self = Self(0x05);
    /// This side does not accept streams of this type or kind here.
    pub const UNEXPECTED_STREAM: Self = Self(0x06);
    /// A push reached a client that has no push channel.
    pub const PUSH_REJECTED: Self = Self(0x07);
    /// The receiver failed while handling the stream.
    pub const INTERNAL: Self = Self(0x08);
    /// The receiver is over its budget of request bytes buffered before handlers run (per
    /// connection or in all); retry later.
    pub const BUSY: Self = Self(0x09);

    /// The number on the wire.
    pub const fn value(self) -> u64 {
        self.0 as u64
    }

    /// The code of a number received on the wire (any number: unknown ones are kept as they are).
    pub fn from_value(value: u64) -> Self {
        Self(u32::try_from(value).unwrap_or(u32::MAX))
    }
}

impl From<StreamCode> for quinn::VarInt {
    fn from(code: StreamCode) -> Self {
        Self::from_u32(code.0)
    }
}

/// A connection close code, sent in QUIC `CONNECTION_CLOSE` frames of type application (listed in
/// `docs/PROTOCOL.md`, section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(u32);

impl CloseCode {
    /// Normal close by the application (client `close`).
    pub const NORMAL: Self = Self(0x00);
    /// The server shut down gracefully.
    pub const SHUTDOWN: Self = Self(0x01);
    /// The peer broke the protocol badly enough to end the connection.
    pub const PROTOCOL_VIOLATION: Self = Self(0x02);
    /// The server is at its connection limit.
    pub const TOO_MANY_CONNECTIONS: Self = Self(0x03);
    /// Closed locally because the peer stopped answering liveness probes while calls waited
    /// (the peer is gone; it rarely sees this code).
    pub const PEER_UNRESPONSIVE: Self = Self(0x04);
    /// The server closed this connection because another one, verified for the same client
    /// identity, took it over.
    pub const TAKEN_OVER: Self = Self(0x05);

    /// The number on the wire.
    pub const fn value(self) -> u64 {
        self.0 as u64
    }

    /// The code of a number received on the wire.
    pub fn from_value(value: u64) -> Self {
        Self(u32::try_from(value).unwrap_or(u32::MAX))
    }
}

impl From<CloseCode> for quinn::VarInt {
    fn from(code: CloseCode) -> Self {
        Self::from_u32(code.0)
    }
}

/// Status codes carried in a response header's error status. Codes below 1000 are quicx's own;
/// applications use 1000 and above.
pub mod status {
    /// No service registered under the requested path.
    pub const UNKNOWN_SERVICE: u32 = 1;
    /// The service has no such method.
    pub const UNKNOWN_METHOD: u32 = 2;
    /// The request payload could not be decoded as the method's argument type.
    pub const DECODE_ERROR: u32 = 3;
    /// The reply could not be encoded.
    pub const ENCODE_ERROR: u32 = 4;
    /// The request's timeout passed on the server before the handler finished.
    pub const DEADLINE_EXCEEDED: u32 = 5;
    /// The handler panicked.
    pub const INTERNAL: u32 = 6;
    /// The request names a codec the receiver does not know.
    pub const UNSUPPORTED_CODEC: u32 = 7;
    /// The receiver is shutting down and takes no new calls.
    pub const SHUTTING_DOWN: u32 = 8;
    /// A push with receipt was dropped by the client's full-channel policy.
    pub const PUSH_DROPPED: u32 = 9;
    /// A push with receipt reached a client without a push channel.
    pub const PUSH_REJECTED: u32 = 10;
    /// A hello was refused (invalid client id).
    pub const HELLO_REFUSED: u32 = 11;
    /// The hello's identity could not be verified: no credentials, or wrong ones.
    pub const UNAUTHENTICATED: u32 = 12;
    /// The credentials are valid but not for the identity claimed.
    pub const PERMISSION_DENIED: u32 = 13;
    /// The caller is over a call rate the server set; the handler did not run.
    pub const RATE_LIMITED: u32 = 14;
    /// Never sent: the caller abandoned the call (its stream was reset). Interceptors and
    /// metrics report such calls with this code.
    pub const CANCELLED: u32 = 15;
    /// Generic application error: a handler's error converted from a `std::error::Error`.
    pub const APPLICATION: u32 = 1000;

    /// A short snake_case name of a status code (`0` is `"ok"`; codes of 1000 and above are
    /// `"application"`): the `status` label of call metrics.
    pub const fn name(code: u32) -> &'static str {
        match code {
            0 => "ok",
            UNKNOWN_SERVICE => "unknown_service",
            UNKNOWN_METHOD => "unknown_method",
            DECODE_ERROR => "decode_error",
            ENCODE_ERROR => "encode_error",
            DEADLINE_EXCEEDED => "deadline_exceeded",
            INTERNAL => "internal",
            UNSUPPORTED_CODEC => "unsupported_codec",
            SHUTTING_DOWN => "shutting_down",
            PUSH_DROPPED => "push_dropped",
            PUSH_REJECTED => "push_rejected",
            HELLO_REFUSED => "hello_refused",
            UNAUTHENTICATED => "unauthenticated",
            PERMISSION_DENIED => "permission_denied",
            RATE_LIMITED => "rate_limited",
            CANCELLED => "cancelled",
            APPLICATION.. => "application",
            _ => "unknown",
        }
    }
}

/// Header of a request frame (kind `0x01`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RequestHeader {
    pub(crate) service_path: String,
    pub(crate) service_method: String,
    pub(crate) metadata: Metadata,
    /// Milliseconds the caller waits; 0 means no deadline.
    pub(crate) timeout_ms: u64,
    pub(crate) flags: u8,
    pub(crate) codec: u8,
}

/// [`RequestHeader`] borrowed, for encoding without copying strings (same bytes on the wire).
#[derive(Debug, Serialize)]
pub(crate) struct RequestHeaderRef<'a> {
    pub(crate) service_path: &'a str,
    pub(crate) service_method: &'a str,
    pub(crate) metadata: &'a Metadata,
    pub(crate) timeout_ms: u64,
    pub(crate) flags: u8,
    pub(crate) codec: u8,
}

/// Status of a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Status {
    Ok,
    Error { code: u32, message: String },
}

impl Status {
    pub(crate) fn error(code: u32, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
        }
    }
}

/// Header of a response frame (kind `0x02`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ResponseHeader {
    pub(crate) status: Status,
    pub(crate) metadata: Metadata,
}

/// Header of a push frame (kind `0x03`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PushHeader {
    pub(crate) service_path: String,
    pub(crate) service_method: String,
    pub(crate) metadata: Metadata,
}

/// [`PushHeader`] borrowed, for encoding (same bytes on the wire); its metadata is a
/// [`Metadata`] or a [`MetadataWith`].
#[derive(Debug, Serialize)]
pub(crate) struct PushHeaderRef<'a, M = Metadata> {
    pub(crate) service_path: &'a str,
    pub(crate) service_method: &'a str,
    pub(crate) metadata: &'a M,
}

/// Metadata encoded as `base` followed by the pairs of `extra` (keys `base` does not have): the
/// same bytes as a [`Metadata`] holding all of them, without building one.
#[derive(Debug)]
pub(crate) struct MetadataWith<'a> {
    pub(crate) base: &'a Metadata,
    pub(crate) extra: &'a [(&'a str, &'a str)],
}

impl Serialize for MetadataWith<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // `Metadata` is a (transparent) newtype of a sequence of pairs: postcard writes either
        // as the sequence.
        struct Pairs<'b>(&'b MetadataWith<'b>);
        impl Serialize for Pairs<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let (base, extra) = (self.0.base, self.0.extra);
                let mut seq = serializer.serialize_seq(Some(base.len() + extra.len()))?;
                for pair in base.iter().chain(extra.iter().copied()) {
                    seq.serialize_element(&pair)?;
                }
                seq.end()
            }
        }
        serializer.serialize_newtype_struct("Metadata", &Pairs(self))
    }
}

/// Header of a hello frame (kind `0x04`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct HelloHeader {
    pub(crate) client_id: Option<String>,
    pub(crate) metadata: Metadata,
}

/// Size limits, checked before anything is allocated for a frame. The two limits are separate:
/// a frame may carry a header up to `max_header_size` *and* a payload up to `max_payload_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest header accepted (bytes). Default 64 KiB.
    pub max_header_size: u32,
    /// Largest payload accepted or sent (bytes). Default 8 MiB.
    pub max_payload_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_size: 64 * 1024,
            max_payload_size: 8 * 1024 * 1024,
        }
    }
}

/// Why a frame could not be encoded or read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// Unknown kind, truncated prefix or header, undecodable header, trailing bytes.
    Malformed(String),
    /// A header above the limit (the limit is known when this side checked it).
    HeaderTooLarge { limit: Option<u64> },
    /// A payload above the limit.
    PayloadTooLarge { limit: Option<u64> },
    /// A header could not be encoded.
    Encode(String),
    /// Buffering the frame would exceed a byte budget.
    OverBudget,
    /// The stream or connection failed underneath.
    Read(quinn::ReadError),
}

impl FrameError {
    /// The stream code to reset/stop with, if the reader should tell the peer.
    pub(crate) fn stream_code(&self) -> Option<StreamCode> {
        match self {
            Self::Malformed(_) => Some(StreamCode::MALFORMED_FRAME),
            Self::HeaderTooLarge { .. } => Some(StreamCode::HEADER_TOO_LARGE),
            Self::PayloadTooLarge { .. } => Some(StreamCode::PAYLOAD_TOO_LARGE),
            Self::OverBudget => Some(StreamCode::BUSY),
            Self::Encode(_) | Self::Read(_) => None,
        }
    }
}

/// Encodes a whole frame into one buffer: prefix, header, then `payload`.
pub(crate) fn encode_frame<H: Serialize>(
    frame_kind: FrameKind,
    header: &H,
    payload: &[u8],
    limits: &Limits,
) -> Result<Bytes, FrameError> {
    // Sized first (a pass over the header, which is small), so that the buffer is allocated
    // once and exactly: `Bytes` takes a vector whose length is its capacity without an
    // allocation of its own, and the payload never makes the buffer grow.
    let header_len = postcard::serialize_with_flavor::<_, _, usize>(
        header,
        postcard::ser_flavors::Size::default(),
    )
    .map_err(|e| FrameError::Encode(e.to_string()))?;
    check_header(header_len, limits)?;
    check_payload(payload.len(), limits)?;
    let mut buf = Vec::with_capacity(PREFIX_LEN + header_len + payload.len());
    buf.push(frame_kind as u8);
    buf.extend_from_slice(&(header_len as u32).to_be_bytes());
    let mut buf =
        postcard::to_extend(header, buf).map_err(|e| FrameError::Encode(e.to_string()))?;
    debug_assert_eq!(buf.len(), PREFIX_LEN + header_len);
    buf.extend_from_slice(payload);
    debug_assert_eq!(buf.len(), buf.capacity());
    Ok(buf.into())
}

/// Encodes a whole frame into one buffer; `write_payload` appends the payload in place (no
/// intermediate copy of an encoded argument).
pub(crate) fn encode_frame_with<H: Serialize, E: From<FrameError>>(
    frame_kind: FrameKind,
    header: &H,
    limits: &Limits,
    write_payload: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E>,
) -> Result<Bytes, E> {
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(&[frame_kind as u8, 0, 0, 0, 0]);
    let mut buf =
        postcard::to_extend(header, buf).map_err(|e| FrameError::Encode(e.to_string()))?;
    let header_len = buf.len() - PREFIX_LEN;
    check_header(header_len, limits)?;
    buf[1..PREFIX_LEN].copy_from_slice(&(header_len as u32).to_be_bytes());
    let buf = write_payload(buf)?;
    check_payload(buf.len() - PREFIX_LEN - header_len, limits)?;
    Ok(buf.into())
}

/// A frame ready to write: its prefix and header, and (for large payloads) the payload as a
/// separate chunk, so it is never copied.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub(crate) head: Bytes,
    pub(crate) payload: Bytes,
}

/// Payloads up to this size are copied behind the header (one chunk, one write); larger ones
/// go to QUIC as their own chunk.
const COPY_PAYLOAD_UP_TO: usize = 1024;

impl Frame {
    /// Encodes `header` in front of `payload`.
    pub(crate) fn encode<H: Serialize>(
        frame_kind: FrameKind,
        header: &H,
        payload: Bytes,
        limits: &Limits,
    ) -> Result<Self, FrameError> {
        if payload.len() <= COPY_PAYLOAD_UP_TO {
            return Ok(Self {
                head: encode_frame(frame_kind, header, &payload, limits)?,
                payload: Bytes::new(),
            });
        }
        check_payload(payload.len(), limits)?;
        Ok(Self {
            head: encode_frame(frame_kind, header, &[], limits)?,
            payload,
        })
    }

    /// A frame encoded in one buffer.
    pub(crate) fn whole(bytes: Bytes) -> Self {
        Self {
            head: bytes,
            payload: Bytes::new(),
        }
    }

    /// Writes the frame (not finishing the stream).
    pub(crate) async fn write(self, send: &mut quinn::SendStream) -> Result<(), quinn::WriteError> {
        if self.payload.is_empty() {
            send.write_chunk(self.head).await
        } else {
            send.write_all_chunks(&mut [self.head, self.payload]).await
        }
    }
}

/// Fails with [`FrameError::PayloadTooLarge`] when a payload is above the limit.
/// [`FrameError::HeaderTooLarge`] if an encoded header of `len` bytes is above the limit.
fn check_header(len: usize, limits: &Limits) -> Result<(), FrameError> {
    if len > limits.max_header_size as usize {
        return Err(FrameError::HeaderTooLarge {
            limit: Some(u64::from(limits.max_header_size)),
        });
    }
    Ok(())
}

pub(crate) fn check_payload(len: usize, limits: &Limits) -> Result<(), FrameError> {
    if len as u64 > limits.max_payload_size {
        return Err(FrameError::PayloadTooLarge {
            limit: Some(limits.max_payload_size),
        });
    }
    Ok(())
}

/// A frame read off a stream: kind, raw header and payload (both slices of one buffer).
#[derive(Debug)]
pub(crate) struct RawFrame {
    pub(crate) kind: FrameKind,
    pub(crate) header: Bytes,
    pub(crate) payload: Bytes,
}

impl RawFrame {
    /// Decodes the header as `H`. Bytes left over after the header inside `header_len` make the
    /// frame malformed.
    pub(crate) fn header<'a, H: Deserialize<'a>>(&'a self) -> Result<H, FrameError> {
        let (header, rest) = postcard::take_from_bytes(&self.header)
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(FrameError::Malformed(format!(
                "{} trailing bytes after the header",
                rest.len()
            )));
        }
        Ok(header)
    }

    /// Decodes a request header and checks its flags: reserved bits make the frame malformed.
    pub(crate) fn request_header(&self) -> Result<RequestHeader, FrameError> {
        let header: RequestHeader = self.header()?;
        if header.flags & !flags::KNOWN != 0 {
            return Err(FrameError::Malformed(format!(
                "reserved request flag bits set: {:#04x}",
                header.flags
            )));
        }
        Ok(header)
    }
}

/// Checks the 5-byte prefix: known kind, header within the limit. Returns the header length.
pub(crate) fn parse_prefix(
    prefix: &[u8],
    limits: &Limits,
) -> Result<(FrameKind, usize), FrameError> {
    let Some(frame_kind) = FrameKind::from_byte(prefix[0]) else {
        return Err(FrameError::Malformed(format!(
            "unknown frame kind {:#04x}",
            prefix[0]
        )));
    };
    let header_len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    if header_len > limits.max_header_size {
        return Err(FrameError::HeaderTooLarge { limit: None });
    }
    Ok((frame_kind, header_len as usize))
}

/// A budget of bytes buffered at once (frames being read), shared by the readers that draw on
/// it.
#[derive(Debug)]
pub(crate) struct Budget {
    used: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            used: std::sync::atomic::AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reserve(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before + n > self.max {
            self.used.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Bytes reserved in budgets while a frame is read; given back when reading ends.
struct Reserved<'a> {
    budgets: &'a [&'a Budget],
    bytes: usize,
}

impl Reserved<'_> {
    fn take(&mut self, n: usize) -> Result<(), FrameError> {
        for (i, budget) in self.budgets.iter().enumerate() {
            if !budget.reserve(n) {
                for earlier in &self.budgets[..i] {
                    earlier.release(n);
                }
                return Err(FrameError::OverBudget);
            }
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        for budget in self.budgets {
            budget.release(self.bytes);
        }
    }
}

/// Reads one whole frame: everything up to the end of the stream.
///
/// The limit is enforced as bytes arrive: never more than `5 + max_header_size + max_payload_size`
/// bytes are buffered, and the header length is checked as soon as the prefix is in. In the common
/// case of a small frame arriving in one chunk, no byte is copied.
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
) -> Result<RawFrame, FrameError> {
    match read_frame_within(recv, limits, &[]).await? {
        Incoming::Frame(raw) => Ok(raw),
        Incoming::Records(_) => Err(FrameError::Malformed(
            "a durable record where one frame was expected".into(),
        )),
    }
}

/// What a peer opened a stream with: one whole frame, or (v2) the start of a durable stream.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A frame that ran to the end of the stream.
    Frame(RawFrame),
    /// The stream starts with a durable record (kind `0x05`): the bytes read so far, to be read
    /// on with a [`RecordReader`]. The stream is not finished: records keep coming.
    Records(Bytes),
}

/// [`read_frame`], holding the bytes buffered meanwhile against `budgets`: past any of them the
/// read fails with [`FrameError::OverBudget`]. The bytes are given back when it returns (the
/// budgets bound what waits to be read, not what handlers hold). A stream that starts with a
/// durable record returns as soon as its kind is known, with the bytes read so far.
pub(crate) async fn read_frame_within(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
    budgets: &[&Budget],
) -> Result<Incoming, FrameError> {
    let mut reserved = Reserved { budgets, bytes: 0 };
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut header_len: Option<usize> = None;
    let mut total = 0usize;
    loop {
        let chunk = recv
            .read_chunk(usize::MAX, true)
            .await
            .map_err(FrameError::Read)?;
        let Some(chunk) = chunk else { break };
        reserved.take(chunk.bytes.len())?;
        total += chunk.bytes.len();
        if first.is_none() && buf.is_empty() {
            first = Some(chunk.bytes);
        } else {
            if let Some(f) = first.take() {
                buf.extend_from_slice(&f);
            }
            buf.extend_from_slice(&chunk.bytes);
        }
        if header_len.is_none() && total >= PREFIX_LEN {
            let bytes: &[u8] = first.as_deref().unwrap_or(&buf);
            let (kind, len) = parse_prefix(&bytes[..PREFIX_LEN], limits)?;
            if kind == FrameKind::Durable {
                return Ok(Incoming::Records(first.unwrap_or_else(|| buf.freeze())));
            }
            header_len = Some(len);
        }
        if let Some(h) = header_len {
            if total.saturating_sub(PREFIX_LEN + h) as u64 > limits.max_payload_size {
                return Err(FrameError::PayloadTooLarge { limit: None });
            }
        }
    }
    let bytes = first.unwrap_or_else(|| buf.freeze());
    split_frame(bytes, limits).map(Incoming::Frame)
}

/// Appends one durable record (v2) to `buf`: the frame prefix with kind `0x05`, the push
/// header, the payload's length (u32, big-endian) and the payload.
pub(crate) fn encode_record<M: Serialize>(
    buf: &mut Vec<u8>,
    header: &PushHeaderRef<'_, M>,
    payload: &[u8],
    limits: &Limits,
) -> Result<(), FrameError> {
    check_payload(payload.len(), limits)?;
    let start = buf.len();
    buf.extend_from_slice(&[FrameKind::Durable as u8, 0, 0, 0, 0]);
    let mut out = postcard::to_extend(header, std::mem::take(buf))
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let header_len = out.len() - start - PREFIX_LEN;
    if let Err(e) = check_header(header_len, limits) {
        out.truncate(start);
        *buf = out;
        return Err(e);
    }
    out[start + 1..start + PREFIX_LEN].copy_from_slice(&(header_len as u32).to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    *buf = out;
    Ok(())
}

/// Reads the records of a durable stream (v2) one at a time, holding at most one incomplete
/// record plus one received chunk: the limits are checked on each record's lengths before its
/// bytes are waited for.
#[derive(Debug)]
pub(crate) struct RecordReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl RecordReader {
    /// Reads on from `start`, the bytes [`read_frame_within`] returned with
    /// [`Incoming::Records`].
    pub(crate) fn new(recv: quinn::RecvStream, start: Bytes) -> Self {
        Self {
            recv,
            buf: BytesMut::from(&start[..]),
        }
    }

    /// The stream, to stop it.
    pub(crate) fn recv(&mut self) -> &mut quinn::RecvStream {
        &mut self.recv
    }

    /// The header length and whole length of the record at the front of the buffer, once its
    /// lengths are in; an error for a wrong kind or a length above the limits.
    fn front_len(&self, limits: &Limits) -> Result<Option<(usize, usize)>, FrameError> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let (kind, header_len) = parse_prefix(&self.buf[..PREFIX_LEN], limits)?;
        if kind != FrameKind::Durable {
            return Err(FrameError::Malformed(format!(
                "a frame of kind {:#04x} inside a durable stream",
                kind as u8
            )));
        }
        let at = PREFIX_LEN + header_len;
        let Some(len) = self.buf.get(at..at + RECORD_LEN_BYTES) else {
            return Ok(None);
        };
        let payload_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        if u64::from(payload_len) > limits.max_payload_size {
            return Err(FrameError::PayloadTooLarge { limit: None });
        }
        Ok(Some((
            header_len,
            at + RECORD_LEN_BYTES + payload_len as usize,
        )))
    }

    /// Whether a whole record is already buffered (the next [`next`](Self::next) returns at
    /// once).
    pub(crate) fn has_record(&self, limits: &Limits) -> bool {
        matches!(self.front_len(limits), Ok(Some((_, len))) if self.buf.len() >= len)
    }

    /// The next record as a push frame (kind, push header, payload); `None` at the end of the
    /// stream between records. A stream that ends inside a record is malformed.
    ///
    /// Cancel safe: bytes read are kept for the next call.
    pub(crate) async fn next(&mut self, limits: &Limits) -> Result<Option<RawFrame>, FrameError> {
        loop {
            if let Some((header_len, len)) = self.front_len(limits)? {
                if self.buf.len() >= len {
                    let mut record = self.buf.split_to(len).freeze();
                    let payload = record.split_off(PREFIX_LEN + header_len + RECORD_LEN_BYTES);
                    return Ok(Some(RawFrame {
                        kind: FrameKind::Push,
                        header: record.slice(PREFIX_LEN..PREFIX_LEN + header_len),
                        payload,
                    }));
                }
            }
            // Everything QUIC has in order now, so that the records already here are taken in
            // (and acknowledged) together.
            let mut chunks: [Bytes; 16] = Default::default();
            let read = self
                .recv
                .read_chunks(&mut chunks)
                .await
                .map_err(FrameError::Read)?;
            match read {
                Some(n) => {
                    for chunk in &chunks[..n] {
                        self.buf.extend_from_slice(chunk);
                    }
                }
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    return Err(FrameError::Malformed(format!(
                        "a durable stream ended inside a record ({} bytes left over)",
                        self.buf.len()
                    )));
                }
            }
        }
    }
}

/// Splits a complete frame buffer into kind, header and payload.
pub(crate) fn split_frame(bytes: Bytes, limits: &Limits) -> Result<RawFrame, FrameError> {
    if bytes.len() < PREFIX_LEN {
        return Err(FrameError::Malformed(format!(
            "truncated frame: {} bytes, the prefix alone is {PREFIX_LEN}",
            bytes.len()
        )));
    }
    let (frame_kind, header_len) = parse_prefix(&bytes[..PREFIX_LEN], limits)?;
    if bytes.len() < PREFIX_LEN + header_len {
        return Err(FrameError::Malformed(format!(
            "truncated frame: header of {header_len} bytes announced, {} present",
            bytes.len() - PREFIX_LEN
        )));
    }
    if (bytes.len() - PREFIX_LEN - header_len) as u64 > limits.max_payload_size {
        return Err(FrameError::PayloadTooLarge { limit: None });
    }
    Ok(RawFrame {
        kind: frame_kind,
        header: bytes.slice(PREFIX_LEN..PREFIX_LEN + header_len),
        payload: bytes.slice(PREFIX_LEN + header_len..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mul_request() -> RequestHeader {
        RequestHeader {
            service_path: "Arith".into(),
            service_method: "Mul".into(),
            metadata: Metadata::new(),
            timeout_ms: 0,
            flags: 0,
            codec: 0,
        }
    }

    /// A frame sized before it is encoded is the frame encoded as it grows, for headers with
    /// and without metadata and payloads from empty to larger than a first guess; and the
    /// limits refuse the same frames.
    #[test]
    fn frames_sized_first_are_the_frames_encoded_growing() {
        let limits = Limits::default();
        let grown = |header: &RequestHeader, payload: &[u8], limits: &Limits| {
            encode_frame_with(FrameKind::Request, header, limits, |mut buf| {
                buf.extend_from_slice(payload);
                Ok::<_, FrameError>(buf)
            })
        };
        let mut with_metadata = mul_request();
        with_metadata.metadata.insert("k", "v".repeat(300));
        for header in [mul_request(), with_metadata] {
            for len in [0, 1, 32, 100, 1024, 70_000] {
                let payload = vec![9u8; len];
                let sized = encode_frame(FrameKind::Request, &header, &payload, &limits).unwrap();
                assert_eq!(sized, grown(&header, &payload, &limits).unwrap(), "{len}");
            }
        }
        let tight = Limits {
            max_header_size: 10,
            max_payload_size: 16,
        };
        let header = mul_request();
        assert!(matches!(
            encode_frame(FrameKind::Request, &header, b"", &tight),
            Err(FrameError::HeaderTooLarge { .. })
        ));
        let loose_header = Limits {
            max_payload_size: 16,
            ..Limits::default()
        };
        assert!(matches!(
            encode_frame(FrameKind::Request, &header, &[0; 17], &loose_header),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        assert!(encode_frame(FrameKind::Request, &header, &[0; 16], &loose_header).is_ok());
    }

    /// The durable record example of `docs/PROTOCOL.md` §4.
    #[test]
    fn durable_record_example_bytes() {
        let metadata = Metadata::new().with("quicx-msg-id", "7");
        let header = PushHeaderRef {
            service_path: "D",
            service_method: "M",
            metadata: &metadata,
        };
        let mut buf = vec![0xaa];
        encode_record(&mut buf, &header, b"hi", &Limits::default()).unwrap();
        let expected: Vec<u8> = [
            &[
                0xaa, 0x05, 0, 0, 0, 0x14, 0x01, 0x44, 0x01, 0x4d, 0x01, 0x0c,
            ][..],
            b"quicx-msg-id",
            &[0x01, 0x37, 0, 0, 0, 2],
            b"hi",
        ]
        .concat();
        assert_eq!(buf, expected, "appended after what was there");
        let too_large = Limits {
            max_payload_size: 1,
            ..Limits::default()
        };
        assert!(matches!(
            encode_record(&mut buf, &header, b"hi", &too_large),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        assert_eq!(buf, expected, "nothing appended on an error");
    }

    #[test]
    fn request_round_trip() {
        let limits = Limits::default();
        let frame = encode_frame(FrameKind::Request, &mul_request(), &[10, 20], &limits).unwrap();
        let raw = split_frame(frame, &limits).unwrap();
        assert_eq!(raw.kind, FrameKind::Request);
        assert_eq!(raw.header::<RequestHeader>().unwrap(), mul_request());
        assert_eq!(&raw.payload[..], &[10, 20]);
    }

    #[derive(Serialize)]
    struct Args {
        a: i64,
        b: i64,
    }

    #[derive(Serialize)]
    struct Reply {
        c: i64,
    }

    #[test]
    fn documented_request_bytes() {
        // The example in docs/PROTOCOL.md: Arith.Mul {A: 10, B: 20}, postcard payload
        // (i64 fields are zigzag varints: 10 -> 0x14, 20 -> 0x28).
        let payload = postcard::to_allocvec(&Args { a: 10, b: 20 }).unwrap();
        let frame = encode_frame(
            FrameKind::Request,
            &mul_request(),
            &payload,
            &Limits::default(),
        )
        .unwrap();
        let expected: &[u8] = &[
            0x01, 0x00, 0x00, 0x00, 0x0e, 0x05, b'A', b'r', b'i', b't', b'h', 0x03, b'M', b'u',
            b'l', 0x00, 0x00, 0x00, 0x00, 0x14, 0x28,
        ];
        assert_eq!(&frame[..], expected);
    }

    #[test]
    fn documented_response_bytes() {
        let header = ResponseHeader {
            status: Status::Ok,
            metadata: Metadata::new(),
        };
        let payload = postcard::to_allocvec(&Reply { c: 200 }).unwrap();
        let frame =
            encode_frame(FrameKind::Response, &header, &payload, &Limits::default()).unwrap();
        assert_eq!(&frame[..], &[0x02, 0, 0, 0, 2, 0x00, 0x00, 0x90, 0x03]);
    }

    #[test]
    fn documented_error_response_bytes() {
        let header = ResponseHeader {
            status: Status::Error {
                code: status::UNKNOWN_METHOD,
                message: "no".into(),
            },
            metadata: Metadata::new(),
        };
        let frame = encode_frame(FrameKind::Response, &header, &[], &Limits::default()).unwrap();
        assert_eq!(
            &frame[..],
            &[0x02, 0, 0, 0, 6, 0x01, 0x02, 0x02, b'n', b'o', 0x00]
        );
    }

    #[test]
    fn documented_push_bytes() {
        let header = PushHeader {
            service_path: "p".into(),
            service_method: "m".into(),
            metadata: Metadata::new().with("k", "v"),
        };
        let frame = encode_frame(FrameKind::Push, &header, b"abcde", &Limits::default()).unwrap();
        assert_eq!(
            &frame[..],
            &[
                0x03, 0, 0, 0, 9, 0x01, b'p', 0x01, b'm', 0x01, 0x01, b'k', 0x01, b'v', b'a', b'b',
                b'c', b'd', b'e'
            ]
        );
    }

    #[test]
    fn documented_request_with_timeout_and_metadata() {
        let header = RequestHeader {
            metadata: Metadata::new().with("trace-id", "7"),
            timeout_ms: 2000,
            ..mul_request()
        };
        let frame = encode_frame(FrameKind::Request, &header, &[], &Limits::default()).unwrap();
        let expected: &[u8] = &[
            0x01, 0, 0, 0, 0x1a, 0x05, b'A', b'r', b'i', b't', b'h', 0x03, b'M', b'u', b'l', 0x01,
            0x08, b't', b'r', b'a', b'c', b'e', b'-', b'i', b'd', 0x01, b'7', 0xd0, 0x0f, 0x00,
            0x00,
        ];
        assert_eq!(&frame[..], expected);
    }

    #[test]
    fn documented_hello_bytes() {
        let header = HelloHeader {
            client_id: Some("device-1".into()),
            metadata: Metadata::new(),
        };
        let frame = encode_frame(FrameKind::Hello, &header, &[], &Limits::default()).unwrap();
        let mut expected = vec![0x04, 0, 0, 0, 0x0b, 0x01, 0x08];
        expected.extend_from_slice(b"device-1");
        expected.push(0x00);
        assert_eq!(&frame[..], &expected[..]);
    }

    #[test]
    fn rejects_bad_prefixes() {
        let limits = Limits::default();
        assert!(matches!(
            split_frame(Bytes::from_static(&[0x01, 0, 0]), &limits),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            split_frame(Bytes::from_static(&[0x09, 0, 0, 0, 0]), &limits),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            split_frame(Bytes::from_static(&[0x01, 0xff, 0xff, 0xff, 0xff]), &limits),
            Err(FrameError::HeaderTooLarge { .. })
        ));
        assert!(matches!(
            split_frame(Bytes::from_static(&[0x01, 0, 0, 0, 9, 1, 2]), &limits),
            Err(FrameError::Malformed(_))
        ));
        let small = Limits {
            max_header_size: 64,
            max_payload_size: 1,
        };
        assert!(matches!(
            split_frame(Bytes::from_static(&[0x02, 0, 0, 0, 0, 1, 2]), &small),
            Err(FrameError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn trailing_header_bytes_and_reserved_flags_are_malformed() {
        // A valid `Arith.Mul` request header followed by one extra byte inside header_len.
        let mut header = postcard::to_allocvec(&mul_request()).unwrap();
        header.push(0x00);
        let mut frame = vec![0x01, 0, 0, 0, header.len() as u8];
        frame.extend_from_slice(&header);
        let raw = split_frame(frame.into(), &Limits::default()).unwrap();
        assert!(matches!(
            raw.header::<RequestHeader>(),
            Err(FrameError::Malformed(m)) if m.contains("trailing")
        ));
        let reserved = RequestHeader {
            flags: 0x02,
            ..mul_request()
        };
        let frame = encode_frame(FrameKind::Request, &reserved, &[], &Limits::default()).unwrap();
        let raw = split_frame(frame, &Limits::default()).unwrap();
        assert!(matches!(
            raw.request_header(),
            Err(FrameError::Malformed(m)) if m.contains("reserved")
        ));
    }

    #[test]
    fn garbage_header_is_malformed() {
        let raw = split_frame(
            Bytes::from_static(&[0x01, 0, 0, 0, 3, 0xff, 0xff, 0xff]),
            &Limits::default(),
        )
        .unwrap();
        assert!(matches!(
            raw.header::<RequestHeader>(),
            Err(FrameError::Malformed(_))
        ));
    }
}

/// Runs every decoder of the wire protocol on `input`, as a peer's bytes would reach them: the
/// frame splitter, each header type, and each payload codec. Used by the fuzzer
/// (`cargo xtask fuzz`) and its tests; it must never panic, whatever the input.
#[doc(hidden)]
pub fn fuzz_decoders(input: &[u8]) {
    let limits = Limits {
        max_header_size: 4096,
        max_payload_size: 64 * 1024,
    };
    if let Ok(raw) = split_frame(Bytes::copy_from_slice(input), &limits) {
        let _ = raw.header::<RequestHeader>();
        let _ = raw.header::<ResponseHeader>();
        let _ = raw.header::<PushHeader>();
        let _ = raw.header::<HelloHeader>();
        for codec in [crate::Codec::Postcard, crate::Codec::Json] {
            let _ = codec.decode::<(i64, String, Vec<u8>)>(&raw.payload);
            let _ = codec.decode::<Metadata>(&raw.payload);
        }
    }
    let _ = parse_prefix(&[input.first().copied().unwrap_or(0); PREFIX_LEN], &limits);
}

/// Valid frames to start mutating from (the byte examples of `docs/PROTOCOL.md`).
#[doc(hidden)]
pub fn fuzz_seeds() -> Vec<Vec<u8>> {
    let limits = Limits::default();
    let request = RequestHeaderRef {
        service_path: "Arith",
        service_method: "Mul",
        metadata: &Metadata::new().with("trace-id", "7"),
        timeout_ms: 2000,
        flags: 0,
        codec: 0,
    };
    let response = ResponseHeader {
        status: Status::Error {
            code: status::UNKNOWN_METHOD,
            message: "no".into(),
        },
        metadata: Metadata::new(),
    };
    let push = PushHeaderRef {
        service_path: "p",
        service_method: "m",
        metadata: &Metadata::new().with("k", "v"),
    };
    let hello = HelloHeader {
        client_id: Some("device-1".into()),
        metadata: Metadata::new(),
    };
    [
        encode_frame(FrameKind::Request, &request, &[0x14, 0x28], &limits),
        encode_frame(FrameKind::Response, &response, &[], &limits),
        encode_frame(FrameKind::Push, &push, b"abcde", &limits),
        encode_frame(FrameKind::Hello, &hello, &[], &limits),
    ]
    .into_iter()
    .filter_map(|f| f.ok().map(|b| b.to_vec()))
    .collect()
}

#[cfg(test)]
mod fuzz_tests {
    use super::*;

    /// A short, deterministic run of the mutation fuzzer; `cargo xtask fuzz` runs it for longer.
    #[test]
    fn decoders_survive_mutated_frames() {
        let seeds = fuzz_seeds();
        assert_eq!(seeds.len(), 4);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..20_000 {
            let mut input = seeds[i % seeds.len()].clone();
            for _ in 0..=(next() % 4) {
                let at = (next() as usize) % (input.len() + 1);
                match next() % 4 {
                    0 if at < input.len() => input[at] = next() as u8,
                    1 => input.truncate(at),
                    2 => input.insert(at, next() as u8),
                    _ if at < input.len() => input[at] ^= 1 << (next() % 8),
                    _ => {}
                }
            }
            fuzz_decoders(&input);
        }
    }
}
