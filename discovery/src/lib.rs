//! Endpoint discovery for quicx: where the servers of a service are.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Errors of discovery backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// An endpoint address could not be parsed.
    #[error("invalid endpoint address `{0}`: {1}")]
    InvalidAddress(String, String),
}
