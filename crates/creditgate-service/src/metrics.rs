//! Metric names of the service (the engine's are in `creditgate_limiter::metrics`, the
//! HTTP layer's in the server's telemetry).

pub const VERIFICATIONS: &str = "creditgate_verifications_total";
pub const VERIFY_SECONDS: &str = "creditgate_verification_duration_seconds";
pub const FAIL_OPEN: &str = "creditgate_verifications_fail_open_total";
