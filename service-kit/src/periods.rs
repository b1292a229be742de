//! The clocks governance runs on, which no site can move.
//!
//! A site chooses its events' `created_at`; the gateway stamps `received_at`
//! from its own clock. So:
//! - **Governance time** (rate and abuse windows, spike detection): an
//!   event counts at its `created_at` clamped to `[received_at - grace,
//!   received_at]`. A future date counts now; a date far in the past counts
//!   at the edge of the grace. The windows' watermark follows these times,
//!   so no event can push it forward or hide behind it, and an honest batch
//!   that waited in the plugin's queue (5 minutes, retried over 15) still
//!   counts whole, at its arrival.
//! - **Billing month** (caps and billing): the month of the event's
//!   `created_at`, while that month is open: until `late_grace` after it
//!   closed. An event arriving later counts toward the month it arrived
//!   in; it keeps its `created_at` for reports. A future date never bills
//!   ahead of the arrival. The gateway stamps it on the event.

use chrono::{DateTime, Datelike, NaiveDate, Utc};

/// An event's governance time (ms).
pub fn governance_time(created_at: i64, received_at: i64, grace_ms: i64) -> i64 {
    created_at.clamp(received_at.saturating_sub(grace_ms), received_at)
}

/// The UTC calendar month of `ms`, as its first day.
pub fn month_start(ms: i64) -> NaiveDate {
    let day = DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .date_naive();
    day.with_day(1).unwrap_or(day)
}

/// The first millisecond of the month after the one of `ms`.
pub fn next_month_start_ms(ms: i64) -> i64 {
    month_start(ms)
        .checked_add_months(chrono::Months::new(1))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(ms, |t| t.and_utc().timestamp_millis())
}

/// `YYYY-MM` of a month.
pub fn month_key(month: NaiveDate) -> String {
    format!("{:04}-{:02}", month.year(), month.month())
}

/// The month of a `YYYY-MM` key.
pub fn parse_month_key(key: &str) -> Option<NaiveDate> {
    // By hand: the processors read one per event, and chrono's format
    // parser (plus the string it needs) was a visible part of their CPU.
    let b = key.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b.get(r)?.iter().try_fold(0u32, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() != 7 || b[4] != b'-' {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    NaiveDate::from_ymd_opt(year, digits(5..7)?, 1)
}

/// The month an event counts toward for caps and billing.
pub fn billing_month(created_at: i64, received_at: i64, late_grace_ms: i64) -> NaiveDate {
    // A date ahead of the arrival bills to the arrival's month at most.
    let created = created_at.min(received_at);
    if received_at >= next_month_start_ms(created).saturating_add(late_grace_ms) {
        month_start(received_at)
    } else {
        month_start(created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(s: &str) -> i64 {
        s.parse::<DateTime<Utc>>().unwrap().timestamp_millis()
    }

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    const GRACE: i64 = 60_000;
    const LATE: i64 = 48 * 3_600_000;

    #[test]
    fn created_at_counts_within_the_grace_and_is_clamped_outside_it() {
        let r = ms("2026-12-02T10:00:00Z");
        assert_eq!(governance_time(r - 30_000, r, GRACE), r - 30_000);
        assert_eq!(governance_time(r - 300_000, r, GRACE), r - GRACE);
        assert_eq!(
            governance_time(r + 290_000, r, GRACE),
            r,
            "future dates count now"
        );
        assert_eq!(governance_time(i64::MIN, r, GRACE), r - GRACE);
    }

    #[test]
    fn a_closed_month_bills_late_events_to_the_month_they_arrive_in() {
        let created = ms("2026-11-30T23:00:00Z");
        // Within 48 h of the month's end: still November.
        assert_eq!(
            billing_month(created, ms("2026-12-01T12:00:00Z"), LATE),
            day("2026-11-01")
        );
        assert_eq!(
            billing_month(created, ms("2026-12-02T23:59:59.999Z"), LATE),
            day("2026-11-01")
        );
        // From 48 h after: December, whatever created_at says.
        assert_eq!(
            billing_month(created, ms("2026-12-03T00:00:00Z"), LATE),
            day("2026-12-01")
        );
        // A date a month back, arriving mid-December: December.
        assert_eq!(
            billing_month(ms("2026-11-10T00:00:00Z"), ms("2026-12-15T00:00:00Z"), LATE),
            day("2026-12-01")
        );
        // A future date at a month's end bills to the month of arrival.
        assert_eq!(
            billing_month(ms("2026-12-01T00:04:00Z"), ms("2026-11-30T23:59:00Z"), LATE),
            day("2026-11-01")
        );
    }

    #[test]
    fn month_keys_round_trip() {
        assert_eq!(month_key(day("2026-01-01")), "2026-01");
        assert_eq!(parse_month_key("2026-01"), Some(day("2026-01-01")));
        assert_eq!(parse_month_key("2026-13"), None);
        for bad in [
            "", "2026-1", "2026-001", "2026/01", "+2026-01", "2026-0a", "2026-00", " 2026-01",
        ] {
            assert_eq!(parse_month_key(bad), None, "{bad:?}");
        }
        assert_eq!(
            next_month_start_ms(ms("2026-12-31T23:59:59Z")),
            ms("2027-01-01T00:00:00Z")
        );
    }

    proptest! {
        #[test]
        fn every_month_key_parses_back_to_its_month(year in 0i32..=9999, month in 1u32..=12) {
            let first = NaiveDate::from_ymd_opt(year, month, 1).unwrap();
            prop_assert_eq!(parse_month_key(&month_key(first)), Some(first));
        }

        #[test]
        fn the_parser_agrees_with_chrono_on_any_seven_bytes(key in "[0-9+ -]{4}-[0-9a ]{2}") {
            let chrono = NaiveDate::parse_from_str(&format!("{key}-01"), "%Y-%m-%d").ok();
            // chrono takes a sign or padding; month keys never have one.
            let digits = key.bytes().enumerate().all(|(i, c)| i == 4 || c.is_ascii_digit());
            if digits {
                prop_assert_eq!(parse_month_key(&key), chrono);
            } else {
                prop_assert_eq!(parse_month_key(&key), None);
            }
        }

        #[test]
        fn governance_time_never_leaves_the_arrival_window(
            created in -1i64 << 45..1i64 << 45,
            received in 0i64..1i64 << 45,
            grace in 0i64..3_600_000,
        ) {
            let t = governance_time(created, received, grace);
            prop_assert!(t <= received && t >= received - grace);
            if (received - grace..=received).contains(&created) {
                prop_assert_eq!(t, created);
            }
        }

        #[test]
        fn billing_never_moves_before_the_created_month_nor_past_the_arrival(
            created in 0i64..1i64 << 42,
            delay in -300_000i64..90 * 86_400_000,
        ) {
            let received = created + delay;
            let m = billing_month(created, received, LATE);
            prop_assert!(m <= month_start(received));
            prop_assert!(m >= month_start(created.min(received)));
            // Either the created month (still open) or the arrival's month.
            prop_assert!(m == month_start(created.min(received)) || m == month_start(received));
        }
    }
}
