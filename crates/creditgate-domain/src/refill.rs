//! The refill calendar: daily refills at 00:00 UTC, monthly ones on `refill_day`
//! (the last day of the month when the month is shorter). A refill is due when the key
//! was last refilled before the start of the current period; it is applied lazily on the
//! first use in the period, so no cron job is needed.

use serde::{Deserialize, Serialize};

use crate::Credits;

const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefillInterval {
    Daily,
    Monthly,
}

impl RefillInterval {
    pub fn as_str(self) -> &'static str {
        match self {
            RefillInterval::Daily => "daily",
            RefillInterval::Monthly => "monthly",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "daily" => Some(Self::Daily),
            "monthly" => Some(Self::Monthly),
            _ => None,
        }
    }
}

/// A validated refill configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refill {
    pub interval: RefillInterval,
    pub amount: Credits,
    /// Day of month (1..=31) for monthly refills; `None` for daily ones.
    pub refill_day: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefillError {
    #[error("refillDay is required when interval is monthly")]
    MissingRefillDay,
    #[error("refillDay must be between 1 and 31")]
    RefillDayOutOfRange,
    #[error("refillDay is only allowed when interval is monthly")]
    RefillDayOnDaily,
}

impl Refill {
    pub fn new(
        interval: RefillInterval,
        amount: Credits,
        refill_day: Option<i64>,
    ) -> Result<Self, RefillError> {
        let refill_day = match (interval, refill_day) {
            (RefillInterval::Daily, None) => None,
            (RefillInterval::Daily, Some(_)) => return Err(RefillError::RefillDayOnDaily),
            (RefillInterval::Monthly, None) => return Err(RefillError::MissingRefillDay),
            (RefillInterval::Monthly, Some(d)) => Some(
                u8::try_from(d)
                    .ok()
                    .filter(|d| (1..=31).contains(d))
                    .ok_or(RefillError::RefillDayOutOfRange)?,
            ),
        };
        Ok(Self {
            interval,
            amount,
            refill_day,
        })
    }

    /// Start (ms since epoch, UTC) of the refill period that contains `now_ms`.
    pub fn period_start(&self, now_ms: i64) -> i64 {
        let today = now_ms.div_euclid(DAY_MS);
        match self.interval {
            RefillInterval::Daily => today * DAY_MS,
            RefillInterval::Monthly => {
                let want = self.refill_day.unwrap_or(1);
                let (y, m, d) = civil_from_days(today);
                let this_month = refill_date(y, m, want);
                let start_day = if d >= this_month {
                    days_from_civil(y, m, this_month)
                } else {
                    let (py, pm) = if m == 1 { (y - 1, 12) } else { (y, m - 1) };
                    days_from_civil(py, pm, refill_date(py, pm, want))
                };
                start_day * DAY_MS
            }
        }
    }

    /// Whether a key last refilled at `last_refill_ms` is due at `now_ms`.
    pub fn is_due(&self, last_refill_ms: i64, now_ms: i64) -> bool {
        last_refill_ms < self.period_start(now_ms)
    }
}

fn refill_date(year: i64, month: u32, want: u8) -> u32 {
    u32::from(want).min(days_in_month(year, month))
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Days in `month` (1..=12) of `year`.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(year) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d is in 1..=31 and m in 1..=12 by construction.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i64, m: u32, d: u32) -> i64 {
        days_from_civil(y, m, d) * DAY_MS
    }

    fn monthly(day: i64) -> Refill {
        Refill::new(
            RefillInterval::Monthly,
            Credits::new(10).unwrap(),
            Some(day),
        )
        .unwrap()
    }

    #[test]
    fn civil_round_trip() {
        for z in -800_000..800_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn daily_period_starts_at_utc_midnight() {
        let r = Refill::new(RefillInterval::Daily, Credits::new(5).unwrap(), None).unwrap();
        let noon = ms(2026, 11, 24) + 12 * 3_600_000;
        assert_eq!(r.period_start(noon), ms(2026, 11, 24));
        assert!(r.is_due(ms(2026, 11, 23) + 5, noon));
        assert!(!r.is_due(ms(2026, 11, 24), noon));
    }

    #[test]
    fn monthly_uses_last_day_of_short_months() {
        let r = monthly(31);
        // In February 2026 (28 days) the refill falls on the 28th.
        assert_eq!(r.period_start(ms(2026, 2, 28) + 1), ms(2026, 2, 28));
        assert_eq!(r.period_start(ms(2026, 2, 27)), ms(2026, 1, 31));
        // Leap year.
        assert_eq!(r.period_start(ms(2024, 2, 29) + 1), ms(2024, 2, 29));
        assert_eq!(r.period_start(ms(2026, 4, 30)), ms(2026, 4, 30));
        // Crossing a year boundary.
        let r = monthly(15);
        assert_eq!(r.period_start(ms(2026, 1, 3)), ms(2025, 12, 15));
        assert!(r.is_due(ms(2025, 12, 14), ms(2025, 12, 15)));
        assert!(!r.is_due(ms(2025, 12, 15), ms(2026, 1, 14)));
    }

    #[test]
    fn validation() {
        let c = Credits::new(1).unwrap();
        assert_eq!(
            Refill::new(RefillInterval::Monthly, c, None),
            Err(RefillError::MissingRefillDay)
        );
        assert_eq!(
            Refill::new(RefillInterval::Monthly, c, Some(32)),
            Err(RefillError::RefillDayOutOfRange)
        );
        assert_eq!(
            Refill::new(RefillInterval::Daily, c, Some(3)),
            Err(RefillError::RefillDayOnDaily)
        );
    }
}
