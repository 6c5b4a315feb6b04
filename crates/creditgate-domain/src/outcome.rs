//! The verification outcome codes of Unkey's v2 `keys.verifyKey`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Valid,
    NotFound,
    Forbidden,
    UsageExceeded,
    RateLimited,
    Unauthorized,
    Disabled,
    InsufficientPermissions,
    Expired,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Valid => "VALID",
            Outcome::NotFound => "NOT_FOUND",
            Outcome::Forbidden => "FORBIDDEN",
            Outcome::UsageExceeded => "USAGE_EXCEEDED",
            Outcome::RateLimited => "RATE_LIMITED",
            Outcome::Unauthorized => "UNAUTHORIZED",
            Outcome::Disabled => "DISABLED",
            Outcome::InsufficientPermissions => "INSUFFICIENT_PERMISSIONS",
            Outcome::Expired => "EXPIRED",
        }
    }
}
