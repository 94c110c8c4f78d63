//! Wall-clock time as the contract writes it: epoch milliseconds for event ids
//! and ISO 8601 UTC with milliseconds (`2026-01-27T12:34:56.789Z`) for
//! timestamps. Hand-written (days-from-civil) so the hot path needs no date
//! crate and no allocation beyond the string it returns.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `epoch_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso8601(epoch_ms: u64) -> String {
    let mut out = String::with_capacity(24);
    write_iso8601(&mut out, epoch_ms);
    out
}

/// Appends `epoch_ms` as ISO 8601 to `out`.
pub fn write_iso8601(out: &mut String, epoch_ms: u64) {
    let ms = epoch_ms % 1000;
    let secs = epoch_ms / 1000;
    let (h, mi, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    use std::fmt::Write;
    let _ = write!(out, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z");
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_769_517_296_789, "2026-01-27T12:34:56.789Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
        ];
        for (ms, want) in cases {
            assert_eq!(iso8601(ms), want, "{ms}");
        }
    }

    #[test]
    fn every_day_for_a_century_round_trips_through_the_calendar() {
        // Reference: count days forward one at a time with month lengths.
        let mut days = 0i64;
        for y in 1970..2070i64 {
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let lens = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            for (m, len) in lens.iter().enumerate() {
                for d in 1..=*len {
                    assert_eq!(civil_from_days(days), (y, m as u32 + 1, d));
                    days += 1;
                }
            }
        }
    }
}
