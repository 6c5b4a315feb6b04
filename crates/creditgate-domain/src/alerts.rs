//! Balance alerts: the thresholds a key's (or a pool's) owner wants to hear about, and
//! the rule that finds which of them one spend crossed.
//!
//! The rule needs no shared state. The exact balances the spends of one account are
//! answered with are disjoint, contiguous ranges of one counter between two top-ups: a
//! spend of `cost` answered `remaining` took the balance from `remaining + cost` to
//! `remaining`. So exactly one spend — whichever node made it, however many raced —
//! takes the balance from at or above a threshold `T` to below it: the one with
//! `remaining < T <= remaining + cost`. The outbox then keeps one event per crossing
//! and arming (a top-up that lifts the balance over `T` again re-arms it).

/// The most thresholds one key or pool may have.
pub const MAX_ALERTS: usize = 10;

/// What a crossing is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertKind {
    /// `credits.low`: the balance went from at or above the threshold to below it.
    Low(u64),
    /// `credits.exhausted`: the balance reached 0, or a spend was refused.
    Exhausted,
}

impl AlertKind {
    /// The threshold whose arming this kind follows: a top-up that lifts the balance to
    /// at least this re-arms it (any credit re-arms `Exhausted`).
    pub fn threshold(self) -> u64 {
        match self {
            AlertKind::Low(t) => t,
            AlertKind::Exhausted => 1,
        }
    }

    /// The name stored with the arming (`low` or `exhausted`).
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Low(_) => "low",
            AlertKind::Exhausted => "exhausted",
        }
    }
}

/// One crossing a decision made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossing {
    pub kind: AlertKind,
    /// The exact balance after the decision.
    pub remaining: u64,
    /// The cost of the spend (or of the refused spend).
    pub cost: u64,
}

/// The crossings of a spend of `cost` answered with the exact balance `remaining`
/// (after it), for the thresholds `alerts`: one per threshold `T` with
/// `remaining < T <= remaining + cost`, and `Exhausted` when it took the balance to 0.
pub fn spend_crossings(alerts: &[u64], remaining: u64, cost: u64) -> Vec<Crossing> {
    if cost == 0 {
        return Vec::new();
    }
    let before = remaining.saturating_add(cost);
    let mut out: Vec<Crossing> = alerts
        .iter()
        .filter(|&&t| remaining < t && t <= before)
        .map(|&t| Crossing {
            kind: AlertKind::Low(t),
            remaining,
            cost,
        })
        .collect();
    if remaining == 0 {
        out.push(Crossing {
            kind: AlertKind::Exhausted,
            remaining,
            cost,
        });
    }
    out
}

/// The crossing of a spend of `cost` refused because the exact balance `remaining` is
/// below it: `Exhausted` (the outbox keeps the first since the last top-up).
pub fn refusal_crossing(remaining: u64, cost: u64) -> Option<Crossing> {
    (remaining < cost).then_some(Crossing {
        kind: AlertKind::Exhausted,
        remaining,
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(c: &[Crossing]) -> Vec<AlertKind> {
        c.iter().map(|c| c.kind).collect()
    }

    #[test]
    fn a_spend_crosses_the_thresholds_between_its_balances() {
        let alerts = [500, 100];
        assert!(
            spend_crossings(&alerts, 500, 1).is_empty(),
            "500 is not below 500"
        );
        assert_eq!(
            kinds(&spend_crossings(&alerts, 499, 1)),
            [AlertKind::Low(500)]
        );
        assert!(spend_crossings(&alerts, 498, 1).is_empty());
        // One big spend crosses both, and reaches 0.
        assert_eq!(
            kinds(&spend_crossings(&alerts, 0, 600)),
            [
                AlertKind::Low(500),
                AlertKind::Low(100),
                AlertKind::Exhausted
            ]
        );
        assert!(
            spend_crossings(&alerts, 0, 0).is_empty(),
            "a free verification spends nothing"
        );
    }

    #[test]
    fn every_threshold_is_crossed_by_exactly_one_of_a_run_of_spends() {
        // Spends of mixed costs take 1,000 down to 0: each threshold once, 0 once.
        let alerts = [1000, 999, 500, 333, 100, 1];
        let costs = [1, 7, 3, 50, 1, 13, 2];
        let mut balance = 1000u64;
        let mut seen = Vec::new();
        let mut i = 0;
        while balance > 0 {
            let cost = costs[i % costs.len()].min(balance);
            balance -= cost;
            seen.extend(kinds(&spend_crossings(&alerts, balance, cost)));
            i += 1;
        }
        let mut expected: Vec<AlertKind> = alerts.iter().map(|&t| AlertKind::Low(t)).collect();
        expected.push(AlertKind::Exhausted);
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_refusal_is_an_exhaustion() {
        assert_eq!(
            refusal_crossing(3, 5).map(|c| c.kind),
            Some(AlertKind::Exhausted)
        );
        assert_eq!(refusal_crossing(5, 5), None);
        assert_eq!(AlertKind::Exhausted.threshold(), 1);
        assert_eq!(AlertKind::Low(42).threshold(), 42);
    }
}
