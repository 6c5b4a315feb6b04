//! The crate's error type, and how a `redis` client error maps onto the hot-store
//! contract ([`HotError`]): whether the call certainly did not run, may have run, or ran
//! and failed.

use creditgate_limiter::ports::HotError;
use redis::ErrorKind;

/// Failure to set up a Redis connection (the hot store or the cache bus).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    /// The URL could not be parsed.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// The first connection, or the setup commands on it, failed.
    #[error("cannot connect to Redis: {0}")]
    Connect(String),
    /// A command failed (cache bus publish).
    #[error("Redis command failed: {0}")]
    Command(String),
}

/// Maps a client error to the hot-store contract.
///
/// * `Unreachable` — the request was never sent, or the server refused it before running
///   it: connection refused, host unreachable, a failed (re)connect of the connection
///   manager, a server still loading its data, a read-only replica, out of memory, a
///   cluster redirection the caller gave up following, a script the node did not have.
/// * `Ambiguous` — the request may have run: a response timeout, or a connection that
///   dropped while the request could have been in flight.
/// * `Other` — the script ran and failed (bad argument, wrong type, script bug).
pub(crate) fn classify(e: &redis::RedisError) -> HotError {
    let text = e.to_string();
    if e.is_io_error() {
        return if not_sent(e) {
            HotError::Unreachable(text)
        } else {
            HotError::Ambiguous(text)
        };
    }
    match e.kind() {
        // Refused before the script ran (no effect): the store is unavailable.
        ErrorKind::BusyLoadingError
        | ErrorKind::ReadOnly
        | ErrorKind::MasterDown
        | ErrorKind::ClusterDown
        | ErrorKind::TryAgain
        | ErrorKind::Moved
        | ErrorKind::Ask
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::NoScriptError => HotError::Unreachable(text),
        // A cluster client with no connection to the node a call is for sent nothing.
        ErrorKind::ClientError if text.contains("connection not found") => {
            HotError::Unreachable(text)
        }
        // A script's first write under `maxmemory` fails before anything was written.
        _ if e.code() == Some("OOM") => HotError::Unreachable(text),
        _ => HotError::Other(text),
    }
}

/// Whether an I/O error certainly happened before the request reached the server.
///
/// The connection manager prefixes errors of its connect phase with "Reconnecting
/// failed" (redis 0.32 `ConnectionManager`); a connection that breaks later gives
/// `BrokenPipe`/`ConnectionReset`/`UnexpectedEof`, which may hide a request in flight.
pub(crate) fn not_sent(e: &redis::RedisError) -> bool {
    if e.is_connection_refusal() {
        return true;
    }
    let io_kind = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    if matches!(
        io_kind,
        Some(
            std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable
                | std::io::ErrorKind::AddrNotAvailable
        )
    ) {
        return true;
    }
    e.to_string().contains("Reconnecting failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_split_by_whether_the_request_left() {
        let refused =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(classify(&refused), HotError::Unreachable(_)));
        let timeout = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(matches!(classify(&timeout), HotError::Ambiguous(_)));
        let dropped = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(matches!(classify(&dropped), HotError::Ambiguous(_)));
        let reconnect = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "Reconnecting failed: timed out",
        ));
        assert!(matches!(classify(&reconnect), HotError::Unreachable(_)));
    }

    #[test]
    fn server_errors() {
        let script = redis::RedisError::from((ErrorKind::ResponseError, "bad", "cost".into()));
        assert!(matches!(classify(&script), HotError::Other(_)));
        let loading = redis::RedisError::from((ErrorKind::BusyLoadingError, "loading"));
        assert!(matches!(classify(&loading), HotError::Unreachable(_)));
    }
}
