//! `Credits` (a balance) and `Cost` (what one verification spends), parsed at the edge.
//!
//! Balances are capped at 2^53 - 1 so that every value survives a round trip through a
//! JavaScript number exactly; costs are capped at 10^12.

use serde::{Deserialize, Serialize};

/// Errors from building or combining credit amounts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditsError {
    #[error("must not be negative")]
    Negative,
    #[error("must be at most {max}")]
    TooLarge { max: u64 },
}

/// A non-negative credit balance, at most [`Credits::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Credits(u64);

impl Credits {
    /// 2^53 - 1: the largest integer a JSON number keeps exactly in every client.
    pub const MAX: u64 = (1 << 53) - 1;
    pub const ZERO: Credits = Credits(0);

    pub fn new(value: u64) -> Result<Self, CreditsError> {
        if value > Self::MAX {
            return Err(CreditsError::TooLarge { max: Self::MAX });
        }
        Ok(Self(value))
    }

    pub fn from_i64(value: i64) -> Result<Self, CreditsError> {
        let v = u64::try_from(value).map_err(|_| CreditsError::Negative)?;
        Self::new(v)
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The value as a signed 64-bit integer (always fits: MAX < i64::MAX).
    pub fn as_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    pub fn checked_add(self, other: Credits) -> Result<Credits, CreditsError> {
        self.0
            .checked_add(other.0)
            .ok_or(CreditsError::TooLarge { max: Self::MAX })
            .and_then(Credits::new)
    }

    /// Subtraction clamped at zero: a decrement below zero leaves an empty balance.
    pub fn saturating_sub(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0))
    }
}

impl TryFrom<i64> for Credits {
    type Error = CreditsError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::from_i64(value)
    }
}

impl From<Credits> for i64 {
    fn from(c: Credits) -> i64 {
        c.as_i64()
    }
}

impl std::fmt::Display for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What one verification spends: 0 ..= 10^12, default 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cost(u64);

impl Cost {
    pub const MAX: u64 = 1_000_000_000_000;
    pub const DEFAULT: Cost = Cost(1);

    pub fn new(value: u64) -> Result<Self, CreditsError> {
        if value > Self::MAX {
            return Err(CreditsError::TooLarge { max: Self::MAX });
        }
        Ok(Self(value))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl Default for Cost {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_bounds() {
        assert!(Credits::new(Credits::MAX).is_ok());
        assert_eq!(
            Credits::new(Credits::MAX + 1),
            Err(CreditsError::TooLarge { max: Credits::MAX })
        );
        assert_eq!(Credits::from_i64(-1), Err(CreditsError::Negative));
        let max = Credits::new(Credits::MAX).unwrap();
        assert!(max.checked_add(Credits::new(1).unwrap()).is_err());
        assert_eq!(
            Credits::new(3)
                .unwrap()
                .saturating_sub(Credits::new(5).unwrap()),
            Credits::ZERO
        );
    }

    #[test]
    fn cost_bounds() {
        assert!(Cost::new(Cost::MAX).is_ok());
        assert!(Cost::new(Cost::MAX + 1).is_err());
        assert_eq!(Cost::default().get(), 1);
    }
}
