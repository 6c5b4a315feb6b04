-- Balance alerts. `credit_alerts` holds a key's (or a pool's) thresholds as a JSON
-- array of integers, descending (NULL: none). `credit_alert_fired` holds the thresholds
-- that fired since their last re-arming: a crossing inserts its row (and its event, in
-- the same transaction) only if none is there, so one crossing is one event whichever
-- node saw it; a top-up that lifts the balance to a threshold again deletes its row.
-- `kind` is `low` (threshold = the alert's) or `exhausted` (threshold 1: any credit
-- re-arms it). Kept column-for-column identical between sqlite/ and postgres/.
ALTER TABLE keys ADD COLUMN credit_alerts TEXT;
ALTER TABLE pools ADD COLUMN credit_alerts TEXT;

CREATE TABLE credit_alert_fired (
    account_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    threshold   BIGINT NOT NULL,
    event_id    TEXT NOT NULL,
    fired_at    BIGINT NOT NULL,
    PRIMARY KEY (account_id, kind, threshold)
);
