//! Sorting sqlx errors into the error types of the ports: connection trouble becomes
//! "unavailable" (the caller may fail closed with a 503), unique violations become
//! conflicts, everything else a backend error. Also the checked conversions between
//! the ports' `u64` and the `BIGINT` columns.

use creditgate_analytics::SinkError;
use creditgate_domain::StoreError;
use creditgate_limiter::ports::LedgerError;
use sqlx::error::ErrorKind;

/// What kind of failure an sqlx error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The database cannot be reached or is too busy right now; nothing committed.
    Unavailable,
    /// A unique or foreign-key constraint refused the write.
    Conflict,
    Other,
}

pub(crate) fn classify(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Class::Unavailable,
        sqlx::Error::Database(db) => {
            if matches!(
                db.kind(),
                ErrorKind::UniqueViolation | ErrorKind::ForeignKeyViolation
            ) {
                return Class::Conflict;
            }
            let code = db.code().unwrap_or_default();
            let transient = if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                sqlite_transient(&code)
            } else {
                postgres_transient(&code)
            };
            if transient {
                Class::Unavailable
            } else {
                Class::Other
            }
        }
        _ => Class::Other,
    }
}

/// SQLite result codes BUSY and LOCKED (extended codes share the low byte).
fn sqlite_transient(code: &str) -> bool {
    code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6))
}

/// Postgres SQLSTATEs: connection exceptions (08…), insufficient resources (53…),
/// shutdown (57P01-03), serialization failure and deadlock (40001, 40P01).
fn postgres_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
}

pub(crate) fn store_error(e: sqlx::Error) -> StoreError {
    match classify(&e) {
        Class::Unavailable => StoreError::Unavailable(e.to_string()),
        Class::Conflict => StoreError::Conflict(e.to_string()),
        Class::Other => StoreError::Backend(e.to_string()),
    }
}

pub(crate) fn ledger_error(e: sqlx::Error) -> LedgerError {
    match classify(&e) {
        Class::Unavailable => LedgerError::Unavailable(e.to_string()),
        Class::Conflict | Class::Other => LedgerError::Other(e.to_string()),
    }
}

pub(crate) fn sink_error(e: sqlx::Error) -> SinkError {
    SinkError(e.to_string())
}

/// A `BIGINT` for a `u64` amount; amounts past `i64::MAX` cannot be stored.
pub(crate) fn to_db(value: u64, what: &str) -> Result<i64, String> {
    i64::try_from(value).map_err(|_| format!("{what} {value} does not fit a BIGINT"))
}

/// A `u64` amount from a `BIGINT` column; negative values mean a corrupt row.
pub(crate) fn from_db(value: i64, what: &str) -> Result<u64, String> {
    u64::try_from(value).map_err(|_| format!("corrupt ledger row: {what} is {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes() {
        assert!(sqlite_transient("5"));
        assert!(sqlite_transient("517"));
        assert!(sqlite_transient("6"));
        assert!(!sqlite_transient("2067"));
        assert!(!sqlite_transient(""));
        assert!(postgres_transient("08006"));
        assert!(postgres_transient("53300"));
        assert!(postgres_transient("57P01"));
        assert!(postgres_transient("40P01"));
        assert!(!postgres_transient("23505"));
        assert!(!postgres_transient(""));
    }

    #[test]
    fn conversions() {
        assert_eq!(to_db(5, "x"), Ok(5));
        assert!(to_db(u64::MAX, "x").is_err());
        assert_eq!(from_db(7, "x"), Ok(7));
        assert!(from_db(-1, "x").is_err());
    }
}
