//! W3C trace context (`traceparent`) carried in call metadata, so a client's span and the
//! server's span of one call share a trace id.
//!
//! - A call made inside [`scope`] — or from inside a handler serving a call that carried a
//!   `traceparent` — sends `traceparent` with the same trace id and a new span id (a child).
//! - A client built with [`ClientBuilder::trace_calls`](crate::ClientBuilder::trace_calls) starts
//!   a new trace for each call made outside any scope.
//! - A call whose metadata already has `traceparent` is sent as it is.
//! - The server parses it: [`Context::trace`](crate::Context::trace) is the server's own span
//!   in that trace, its `serve` tracing span records `trace_id`, `span_id` and `parent_id`, and
//!   the handler runs inside [`scope`] of it, so calls it makes (to other services, reverse
//!   calls) continue the trace. The client's `call` tracing span records the same `trace_id`.
//!
//! A malformed `traceparent` is ignored (the W3C rule), never an error. quicx does not export
//! spans; a `tracing` subscriber (or an OpenTelemetry bridge) does.
//!
//! ```
//! use quicx::trace::{TraceContext, scope};
//! # async fn calls(client: &quicx::Client) -> quicx::Result<()> {
//! let root = TraceContext::new_root();
//! scope(root, async {
//!     // Both calls carry `traceparent: 00-<root's trace id>-<new span id>-01`.
//!     let _: i64 = client.call("Arith", "Mul", &(6, 7)).await?;
//!     let _: i64 = client.call("Arith", "Mul", &(2, 3)).await?;
//!     Ok::<_, quicx::Error>(())
//! })
//! .await
//! # }
//! ```

use std::{fmt, future::Future};

/// The metadata key of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// One span's place in a trace: W3C `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

impl TraceContext {
    /// A new trace (random trace id and span id), sampled.
    pub fn new_root() -> Self {
        let mut trace_id: [u8; 16] = rand::random();
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        Self {
            trace_id,
            span_id: new_span_id(),
            flags: 0x01,
        }
    }

    /// A child span in the same trace: same trace id and flags, new span id.
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// Parses a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`). `None` if it is malformed,
    /// has an all-zero id, or uses version `ff`; later versions are read by their first four
    /// fields, as the W3C specification asks.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version.eq_ignore_ascii_case("ff") {
            return None;
        }
        let version = u8::from_str_radix(version, 16).ok()?;
        if version == 0 && (parts.next().is_some() || value.len() != 55) {
            return None;
        }
        let trace_id: [u8; 16] = hex_array(trace)?;
        let span_id: [u8; 8] = hex_array(span)?;
        let [flags] = hex_array::<1>(flags)?;
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// This span's id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span_id)
    }

    /// Whether the trace is sampled (flag `01`).
    pub fn is_sampled(&self) -> bool {
        self.flags & 0x01 != 0
    }
}

/// The `traceparent` value.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

fn new_span_id() -> [u8; 8] {
    let mut id: [u8; 8] = rand::random();
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Runs `fut` with `trace` as the current trace context: calls it makes carry a child of it.
/// Returns what `fut` returns; dropping the returned future drops `fut`.
pub async fn scope<F: Future>(trace: TraceContext, fut: F) -> F::Output {
    CURRENT.scope(trace, fut).await
}

/// The current trace context: set by [`scope`], and inside a handler serving a traced call.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|t| *t).ok()
}

/// What a served call's trace context is, given its metadata: the server's own span, a child of
/// the caller's.
pub(crate) fn served(metadata: &crate::Metadata) -> Option<TraceContext> {
    metadata
        .get(TRACEPARENT)
        .and_then(TraceContext::parse)
        .map(|parent| parent.child())
}

/// The `traceparent` an outgoing call should carry, if any: a child of the current scope, or a
/// new root when `root_if_none`.
pub(crate) fn outgoing(root_if_none: bool) -> Option<TraceContext> {
    match current() {
        Some(t) => Some(t.child()),
        None => root_if_none.then(TraceContext::new_root),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(v).unwrap();
        assert_eq!(t.to_string(), v);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
        assert!(t.is_sampled());
        let child = t.child();
        assert_eq!(child.trace_id(), t.trace_id());
        assert_ne!(child.span_id(), t.span_id());
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        // A later version with extra fields is read by its first four.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(TraceContext::parse(future).is_some());
    }

    #[tokio::test]
    async fn scope_makes_children_of_the_current_trace() {
        assert_eq!(current(), None);
        assert_eq!(outgoing(false), None);
        let root = TraceContext::new_root();
        let child = scope(root, async { outgoing(false) }).await.unwrap();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert!(outgoing(true).is_some());
    }
}
