//! Field checks shared by the handlers. Each failure names the field and how to fix it.

use creditgate_domain::{Credits, Refill, RefillError, RefillInterval};
use serde_json::Value;

use crate::error::{ApiError, FieldError};
use crate::wire::RefillWire;

/// Collects field errors; `finish` turns them into one 400.
#[derive(Debug, Default)]
pub struct Checks(Vec<FieldError>);

impl Checks {
    pub fn push(&mut self, location: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.0.push(FieldError::new(location, message).fix(fix));
    }

    pub fn len(&mut self, location: &str, value: &str, min: usize, max: usize) {
        let n = value.chars().count();
        if n < min || n > max {
            self.push(
                location,
                format!("must be {min} to {max} characters long, got {n}"),
                format!("send between {min} and {max} characters"),
            );
        }
    }

    pub fn charset(&mut self, location: &str, value: &str, allowed: &str, ok: fn(char) -> bool) {
        if !value.chars().all(ok) {
            self.push(
                location,
                format!("contains characters outside {allowed}"),
                format!("use only {allowed}"),
            );
        }
    }

    /// Only an absent or empty list is accepted for features creditgate does not have.
    pub fn unsupported_list(&mut self, location: &str, value: &Option<Vec<Value>>) {
        if value.as_ref().is_some_and(|v| !v.is_empty()) {
            self.push(
                location,
                "is not supported by creditgate",
                "omit the field or send an empty list",
            );
        }
    }

    pub fn credits(&mut self, location: &str, value: i64) -> Option<Credits> {
        match Credits::from_i64(value) {
            Ok(c) => Some(c),
            Err(e) => {
                self.push(
                    location,
                    format!("{e} (got {value})"),
                    format!("send an integer from 0 to {}", Credits::MAX),
                );
                None
            }
        }
    }

    /// A refill schedule; `limited` says whether the key will have a balance.
    pub fn refill(&mut self, location: &str, wire: &RefillWire, limited: bool) -> Option<Refill> {
        if !limited {
            self.push(
                location,
                "a refill needs a balance: credits.remaining is null (unlimited)",
                "set credits.remaining to a number, or drop the refill",
            );
            return None;
        }
        let Some(interval) = RefillInterval::parse(&wire.interval) else {
            self.push(
                &format!("{location}.interval"),
                format!("must be 'daily' or 'monthly', got '{}'", wire.interval),
                "send 'daily' or 'monthly'",
            );
            return None;
        };
        let amount_loc = format!("{location}.amount");
        let amount = self.credits(&amount_loc, wire.amount)?;
        if amount.get() == 0 {
            self.push(&amount_loc, "must be at least 1", "send a positive amount");
            return None;
        }
        match Refill::new(interval, amount, wire.refill_day) {
            Ok(r) => Some(r),
            Err(e) => {
                let fix = match e {
                    RefillError::MissingRefillDay => "add refillDay (1-31) for monthly refills",
                    RefillError::RefillDayOutOfRange => "send a refillDay from 1 to 31",
                    RefillError::RefillDayOnDaily => "drop refillDay, or use interval 'monthly'",
                };
                self.push(&format!("{location}.refillDay"), e.to_string(), fix);
                None
            }
        }
    }

    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let detail = self
            .0
            .iter()
            .map(|e| format!("{}: {}", e.location, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        Err(ApiError::BadRequest {
            detail,
            errors: self.0,
        })
    }
}

pub fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

pub fn is_external_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

pub fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '=' | '/' | '.' | ':' | '-')
}

pub fn refill_wire(r: &Refill) -> RefillWire {
    RefillWire {
        interval: r.interval.as_str().to_owned(),
        amount: r.amount.as_i64(),
        refill_day: r.refill_day.map(i64::from),
    }
}
