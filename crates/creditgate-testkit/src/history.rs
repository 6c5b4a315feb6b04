//! A history of every verification of a run, and the checker that holds it whole to
//! creditgate's promise (the Jepsen way: record everything, check afterwards):
//!
//! - **no over-spend**: per key, the costs of the `VALID` answers never exceed what the
//!   key was granted (its balance plus what was added during the run);
//! - **a linearizable balance** (keys whose balance nothing but spends changed during
//!   the run): a key's balance behaves as one counter that only spends lower. So the
//!   balances `VALID` answers state cover disjoint ranges (`[credits, credits + cost)`,
//!   no credit spent twice), and when one answer came back before another was sent, the
//!   balance the later one started from is at most what the earlier one left
//!   (`pre(later) ≤ post(earlier)`; a `USAGE_EXCEEDED` answer's `credits` is both); a
//!   `USAGE_EXCEEDED` answer states a balance below its cost;
//!   `VALID` answers a node decided on the ledger alone while it could not reach the
//!   hot store (`creditsExact: false`, DESIGN §3.5) state only a lower bound: they are
//!   held to the over-spend bound and the accounting, not to the counter;
//! - **accounting**: once the run converged, every credit granted is spent by a `VALID`
//!   answer, left in the balance, or explained: by an ambiguous answer (a timeout, or a
//!   503 saying the outcome is unknown) or by a loss a node reported (a hot store that
//!   lost its data). Missing credits beyond that, or credits that appeared from nowhere,
//!   are violations.
//!
//! The checker names the first violating operation (and the one it conflicts with), so
//! a failed run can be read without the whole history.

use std::fmt;

/// What one verification was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `VALID`, with the balance after the spend.
    Valid { credits: u64 },
    /// `VALID`, decided on the ledger alone by a node that could not reach the hot
    /// store (`creditsExact: false`): the balance after it is at least `credits`.
    ValidOnLedger { credits: u64 },
    /// `USAGE_EXCEEDED`, with the whole balance (nothing spent).
    Exceeded { credits: u64 },
    /// An answer that says nothing was spent (a 503 "nothing was spent", an overload
    /// 503, a refused connection).
    Refused,
    /// No answer in time, a broken connection after sending, or a 503 saying the
    /// outcome is unknown: it may have spent.
    Ambiguous,
}

/// One verification as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// The node it was sent to.
    pub node: usize,
    /// The key (an index into the run's keys).
    pub key: usize,
    pub cost: u64,
    /// Microseconds since the run began: when it was sent and when its answer came
    /// (for an ambiguous op, when the client gave up).
    pub sent_us: u64,
    pub answered_us: u64,
    pub answer: Answer,
}

/// What is known of one key besides the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBook {
    /// Its balance before the run plus every credit added during it (refills,
    /// increments); `None`: not known exactly (a `set` or `decrement` during the run).
    pub granted: Option<u64>,
    /// Whether anything but spends changed its balance during the run (then only the
    /// over-spend bound and the accounting are checked).
    pub changed: bool,
    /// Its converged balance after the run (`None`: not read).
    pub final_remaining: Option<u64>,
    /// What `VALID` answers may spend at most when `granted` is not exact (a refill
    /// that could apply once, a `set`): the over-spend bound then.
    pub at_most: Option<u64>,
    /// A `set` that was the key's last change of the run: checked on its own.
    pub set: Option<SetBook>,
}

/// A `keys.updateCredits` `set` to `value`, sent and answered at these times (µs since
/// the run began), after which nothing but spends changed the key. The spends sent after
/// its answer come out of `value`, and what `value` lost by the end was spent by answers
/// that came back after it was sent (or is explained by an ambiguous one or a loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetBook {
    pub value: u64,
    pub sent_us: u64,
    pub answered_us: u64,
}

impl KeyBook {
    /// A key whose balance nothing but spends changed: `granted` exact.
    pub fn exact(granted: u64, final_remaining: u64) -> Self {
        Self {
            granted: Some(granted),
            changed: false,
            final_remaining: Some(final_remaining),
            at_most: None,
            set: None,
        }
    }
}

/// A violation, with the operations involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub key: usize,
    pub detail: String,
    pub op: Option<Box<Op>>,
    pub other: Option<Box<Op>>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (key {}): {}", self.rule, self.key, self.detail)?;
        if let Some(op) = &self.op {
            write!(f, "\n  op:    {op:?}")?;
        }
        if let Some(other) = &self.other {
            write!(f, "\n  other: {other:?}")?;
        }
        Ok(())
    }
}

/// What a run's history adds up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub ops: u64,
    pub valid: u64,
    /// Of the `VALID` answers, those decided on the ledger alone.
    pub on_ledger: u64,
    pub exceeded: u64,
    pub refused: u64,
    pub ambiguous: u64,
    /// Credits of `VALID` answers.
    pub spent: u64,
    /// Credits neither spent by a `VALID` answer nor left in a balance.
    pub unaccounted: u64,
    /// Costs of the ambiguous answers.
    pub ambiguous_credits: u64,
}

impl Op {
    /// The balance the op found (before its spend) and left.
    fn pre_post(&self) -> Option<(u64, u64)> {
        match self.answer {
            Answer::Valid { credits } => Some((credits.saturating_add(self.cost), credits)),
            Answer::Exceeded { credits } => Some((credits, credits)),
            // A lower bound states no balance a counter could be checked against.
            Answer::ValidOnLedger { .. } | Answer::Refused | Answer::Ambiguous => None,
        }
    }
}

/// Checks a whole history against the books of its keys; `lost_reported`: credits the
/// nodes reported lost with a hot store's data during the run.
pub fn check(ops: &[Op], books: &[KeyBook], lost_reported: u64) -> Result<Summary, Violation> {
    let mut summary = Summary {
        ops: ops.len() as u64,
        ..Summary::default()
    };
    let mut by_key: Vec<Vec<Op>> = vec![Vec::new(); books.len()];
    for op in ops {
        let Some(list) = by_key.get_mut(op.key) else {
            return Err(Violation {
                rule: "history",
                key: op.key,
                detail: format!("an op of key {} but only {} keys", op.key, books.len()),
                op: Some(Box::new(*op)),
                other: None,
            });
        };
        list.push(*op);
        match op.answer {
            Answer::Valid { .. } => {
                summary.valid += 1;
                summary.spent += op.cost;
            }
            Answer::ValidOnLedger { .. } => {
                summary.valid += 1;
                summary.on_ledger += 1;
                summary.spent += op.cost;
            }
            Answer::Exceeded { .. } => summary.exceeded += 1,
            Answer::Refused => summary.refused += 1,
            Answer::Ambiguous => {
                summary.ambiguous += 1;
                summary.ambiguous_credits += op.cost;
            }
        }
    }
    for (key, (ops, book)) in by_key.iter().zip(books).enumerate() {
        let spent: u64 = ops
            .iter()
            .filter(|o| {
                matches!(
                    o.answer,
                    Answer::Valid { .. } | Answer::ValidOnLedger { .. }
                )
            })
            .map(|o| o.cost)
            .sum();
        if let Some(granted) = book.granted {
            if spent > granted {
                return Err(Violation {
                    rule: "over-spend",
                    key,
                    detail: format!("VALID answers spent {spent} of {granted} granted"),
                    op: None,
                    other: None,
                });
            }
            if let Some(left) = book.final_remaining {
                let accounted = spent.saturating_add(left);
                if accounted > granted {
                    return Err(Violation {
                        rule: "credits from nowhere",
                        key,
                        detail: format!(
                            "{spent} spent by VALID answers + {left} left > {granted} granted"
                        ),
                        op: None,
                        other: None,
                    });
                }
                summary.unaccounted += granted - accounted;
            }
        }
        if book.granted.is_none() {
            if let Some(most) = book.at_most.filter(|&m| spent > m) {
                return Err(Violation {
                    rule: "over-spend",
                    key,
                    detail: format!("VALID answers spent {spent}, more than the {most} possible"),
                    op: None,
                    other: None,
                });
            }
        }
        if let (Some(set), Some(left)) = (book.set, book.final_remaining) {
            after_set(key, ops, set, left, lost_reported)?;
        }
        if !book.changed {
            linearizable(key, ops)?;
        }
    }
    let explained = summary.ambiguous_credits.saturating_add(lost_reported);
    if summary.unaccounted > explained {
        return Err(Violation {
            rule: "unaccounted credits",
            key: 0,
            detail: format!(
                "{} credits neither spent nor left, but only {} ambiguous and {} reported lost",
                summary.unaccounted, summary.ambiguous_credits, lost_reported
            ),
            op: None,
            other: None,
        });
    }
    Ok(summary)
}

/// The checks of a key's last `set` (see [`SetBook`]).
fn after_set(
    key: usize,
    ops: &[Op],
    set: SetBook,
    left: u64,
    lost_reported: u64,
) -> Result<(), Violation> {
    let valid = |o: &&Op| {
        matches!(
            o.answer,
            Answer::Valid { .. } | Answer::ValidOnLedger { .. }
        )
    };
    let surely_after: u64 = ops
        .iter()
        .filter(valid)
        .filter(|o| o.sent_us > set.answered_us)
        .map(|o| o.cost)
        .sum();
    if surely_after.saturating_add(left) > set.value {
        return Err(Violation {
            rule: "over-spend after a set",
            key,
            detail: format!(
                "set to {}: VALID answers sent after it spent {surely_after} and {left} is left",
                set.value
            ),
            op: None,
            other: None,
        });
    }
    let maybe_after: u64 = ops
        .iter()
        .filter(|o| o.answered_us > set.sent_us)
        .filter(|o| valid(o) || o.answer == Answer::Ambiguous)
        .map(|o| o.cost)
        .sum();
    let gone = set.value.saturating_sub(left);
    if gone > maybe_after.saturating_add(lost_reported) {
        return Err(Violation {
            rule: "unaccounted credits after a set",
            key,
            detail: format!(
                "set to {}, {left} left: {gone} gone, but answers that could follow the set \
                 spent or may have spent only {maybe_after} ({lost_reported} reported lost)",
                set.value
            ),
            op: None,
            other: None,
        });
    }
    Ok(())
}

/// The single-counter checks of one key's decided ops (see the module docs).
fn linearizable(key: usize, ops: &[Op]) -> Result<(), Violation> {
    // USAGE_EXCEEDED states a balance below its cost.
    for op in ops {
        if let Answer::Exceeded { credits } = op.answer {
            if credits >= op.cost {
                return Err(Violation {
                    rule: "exceeded with a balance that covers the cost",
                    key,
                    detail: format!("balance {credits}, cost {}", op.cost),
                    op: Some(Box::new(*op)),
                    other: None,
                });
            }
        }
    }
    // VALID answers cover disjoint ranges [credits, credits + cost).
    let mut valid: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.answer, Answer::Valid { .. }))
        .collect();
    valid.sort_by_key(|o| o.pre_post().map(|(_, post)| post));
    for pair in valid.windows(2) {
        let (Some((a_pre, _)), Some((_, b_post))) = (pair[0].pre_post(), pair[1].pre_post()) else {
            continue;
        };
        if b_post < a_pre {
            return Err(Violation {
                rule: "a credit spent twice",
                key,
                detail: format!(
                    "VALID answers left {} and {} with costs {} and {}: their ranges overlap",
                    pair[0].answer_credits(),
                    pair[1].answer_credits(),
                    pair[0].cost,
                    pair[1].cost
                ),
                op: Some(Box::new(*pair[1])),
                other: Some(Box::new(*pair[0])),
            });
        }
    }
    // Real-time order: if X was answered before Y was sent, pre(Y) ≤ post(X). Sweep Y
    // by send time, keeping the lowest post of the ops answered before it.
    let mut decided: Vec<&Op> = ops.iter().filter(|o| o.pre_post().is_some()).collect();
    let mut by_answer = decided.clone();
    by_answer.sort_by_key(|o| o.answered_us);
    decided.sort_by_key(|o| o.sent_us);
    let mut lowest: Option<(u64, &Op)> = None;
    let mut i = 0;
    for y in decided {
        while i < by_answer.len() && by_answer[i].answered_us < y.sent_us {
            let x = by_answer[i];
            if let Some((_, post)) = x.pre_post() {
                if lowest.is_none_or(|(low, _)| post < low) {
                    lowest = Some((post, x));
                }
            }
            i += 1;
        }
        if let (Some((low, x)), Some((pre, _))) = (lowest, y.pre_post()) {
            if pre > low {
                return Err(Violation {
                    rule: "not linearizable",
                    key,
                    detail: format!(
                        "an op sent after another was answered found balance {pre}, more \
                         than the {low} the earlier one left"
                    ),
                    op: Some(Box::new(*y)),
                    other: Some(Box::new(*x)),
                });
            }
        }
    }
    Ok(())
}

impl Op {
    fn answer_credits(&self) -> u64 {
        match self.answer {
            Answer::Valid { credits }
            | Answer::ValidOnLedger { credits }
            | Answer::Exceeded { credits } => credits,
            Answer::Refused | Answer::Ambiguous => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: usize, sent: u64, answered: u64, answer: Answer) -> Op {
        Op {
            node: 0,
            key,
            cost: 1,
            sent_us: sent,
            answered_us: answered,
            answer,
        }
    }

    fn valid(sent: u64, answered: u64, credits: u64) -> Op {
        op(0, sent, answered, Answer::Valid { credits })
    }

    fn book(granted: u64, left: u64) -> KeyBook {
        KeyBook::exact(granted, left)
    }

    #[test]
    fn a_sequential_spend_down_passes() {
        let ops: Vec<Op> = (0..3)
            .map(|i| valid(i * 10, i * 10 + 5, 2 - i))
            .chain([op(0, 40, 45, Answer::Exceeded { credits: 0 })])
            .collect();
        let s = check(&ops, &[book(3, 0)], 0).expect("a clean history");
        assert_eq!((s.valid, s.exceeded, s.spent, s.unaccounted), (3, 1, 3, 0));
    }

    #[test]
    fn concurrent_answers_may_come_in_any_order() {
        // Both in flight together: either order of balances is fine.
        let ops = [valid(0, 10, 1), valid(1, 9, 0)];
        check(&ops, &[book(2, 0)], 0).expect("concurrent ops");
        let ops = [valid(0, 10, 0), valid(1, 9, 1)];
        check(&ops, &[book(2, 0)], 0).expect("concurrent ops");
    }

    #[test]
    fn over_spend_is_caught() {
        let ops = [valid(0, 1, 1), valid(2, 3, 0), valid(4, 5, 0)];
        let v = check(&ops, &[book(2, 0)], 0).expect_err("three VALID of 2");
        assert_eq!(v.rule, "over-spend");
    }

    #[test]
    fn a_credit_spent_twice_is_caught_with_both_ops() {
        let ops = [valid(0, 10, 4), valid(1, 9, 4)];
        let v = check(&ops, &[book(10, 8)], 0).expect_err("same balance twice");
        assert_eq!(v.rule, "a credit spent twice");
        assert!(v.op.is_some() && v.other.is_some(), "{v}");
    }

    #[test]
    fn a_later_op_seeing_an_older_balance_is_caught() {
        // The first left 5; one sent after it was answered found 7.
        let ops = [valid(0, 10, 5), valid(20, 30, 6)];
        let v = check(&ops, &[book(10, 5)], 0).expect_err("stale read");
        assert_eq!(v.rule, "not linearizable");
        assert_eq!(v.other.as_ref().map(|o| o.sent_us), Some(0), "{v}");
    }

    #[test]
    fn exceeded_after_valid_is_fine_but_valid_after_exceeded_is_not() {
        let ops = [
            valid(0, 10, 0),
            op(0, 20, 30, Answer::Exceeded { credits: 0 }),
        ];
        check(&ops, &[book(1, 0)], 0).expect("spent, then out");
        let ops = [
            op(0, 0, 10, Answer::Exceeded { credits: 0 }),
            valid(20, 30, 0),
        ];
        let v = check(&ops, &[book(1, 0)], 0).expect_err("out, then spent");
        assert_eq!(v.rule, "not linearizable");
    }

    #[test]
    fn exceeded_stating_a_covering_balance_is_caught() {
        let ops = [op(0, 0, 10, Answer::Exceeded { credits: 3 })];
        let v = check(&ops, &[book(3, 3)], 0).expect_err("3 covers 1");
        assert_eq!(v.rule, "exceeded with a balance that covers the cost");
    }

    #[test]
    fn missing_credits_need_an_ambiguous_answer_or_a_reported_loss() {
        let ops = [valid(0, 10, 8)];
        // 10 granted, 1 spent, 8 left: 1 missing.
        let v = check(&ops, &[book(10, 8)], 0).expect_err("1 missing");
        assert_eq!(v.rule, "unaccounted credits");
        check(&ops, &[book(10, 8)], 1).expect("reported lost");
        let with_timeout = [ops[0], op(0, 20, 500, Answer::Ambiguous)];
        let s = check(&with_timeout, &[book(10, 8)], 0).expect("an ambiguous spend");
        assert_eq!((s.unaccounted, s.ambiguous_credits), (1, 1));
    }

    #[test]
    fn ledger_decided_answers_count_as_spends_but_not_as_balances() {
        // A node cut off from the hot store spent on the ledger and stated its part (4)
        // while the hot store's answers went on from 9: not a credit spent twice...
        let on_ledger = op(0, 1, 9, Answer::ValidOnLedger { credits: 4 });
        let ops = [valid(0, 10, 9), on_ledger, valid(20, 30, 8)];
        let s = check(&ops, &[book(10, 7)], 0).expect("a lower bound is not a balance");
        assert_eq!((s.valid, s.spent, s.unaccounted), (3, 3, 0));
        // ...but its spend counts against what was granted.
        let over = [valid(0, 10, 1), valid(11, 12, 0), on_ledger];
        let v = check(&over, &[book(2, 0)], 0).expect_err("3 VALID of 2");
        assert_eq!(v.rule, "over-spend");
    }

    #[test]
    fn a_set_is_checked_on_its_own() {
        let set = SetBook {
            value: 5,
            sent_us: 100,
            answered_us: 110,
        };
        let book = |left| KeyBook {
            granted: None,
            changed: true,
            at_most: Some(10 + 5),
            set: Some(set),
            ..KeyBook::exact(0, left)
        };
        // Before the set, 10 → 8; set to 5; two spends after it leave 3.
        let ops = [
            valid(0, 10, 9),
            valid(20, 30, 8),
            valid(200, 210, 4),
            valid(220, 230, 3),
        ];
        check(&ops, &[book(3)], 0).expect("spends on both sides of a set");
        // Three sent after the set was answered, but 3 still left: 6 from 5.
        let over = [ops[2], ops[3], valid(240, 250, 2)];
        assert_eq!(
            check(&over, &[book(3)], 0).expect_err("6 of 5").rule,
            "over-spend after a set"
        );
        // 5 set, 1 left, but only two spends could follow it: 2 credits gone.
        let v = check(&ops, &[book(1)], 0).expect_err("2 missing");
        assert_eq!(v.rule, "unaccounted credits after a set");
        check(&ops, &[book(1)], 2).expect("reported lost");
        // A concurrent spend (answered after the set was sent) may have come after it.
        let racing = [valid(90, 105, 4), ops[2], ops[3]];
        check(&racing, &[book(2)], 0).expect("a spend racing the set");
        // At most one refill: more than the bound is an over-spend.
        let bounded = KeyBook {
            granted: None,
            changed: true,
            at_most: Some(2),
            ..KeyBook::exact(0, 0)
        };
        let three = [valid(0, 1, 1), valid(2, 3, 0), valid(4, 5, 0)];
        assert_eq!(
            check(&three, &[bounded], 0).expect_err("3 of 2").rule,
            "over-spend"
        );
    }

    #[test]
    fn credits_from_nowhere_are_caught() {
        let ops = [valid(0, 10, 9)];
        let v = check(&ops, &[book(10, 10)], 0).expect_err("1 spent, 10 left of 10");
        assert_eq!(v.rule, "credits from nowhere");
    }

    #[test]
    fn changed_keys_skip_the_counter_checks_only() {
        let changed = KeyBook {
            changed: true,
            ..KeyBook::exact(20, 18)
        };
        // A refill between them makes a higher later balance fine.
        let ops = [valid(0, 10, 0), valid(20, 30, 9)];
        check(&ops, &[changed], 0).expect("refilled in between");
        let over = [valid(0, 1, 0); 21];
        assert_eq!(
            check(&over, &[changed], 0).expect_err("21 of 20").rule,
            "over-spend"
        );
    }
}
