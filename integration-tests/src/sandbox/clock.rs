//! Wall-clock helpers (no date crate needed): ISO-8601 timestamps and
//! `YYYY-MM-DD` dates in UTC, as GitLab renders them.

use std::time::{SystemTime, UNIX_EPOCH};

fn unix_now() -> (i64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_millis())
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD` for today shifted by `offset_days`.
pub fn date(offset_days: i64) -> String {
    let (secs, _) = unix_now();
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400) + offset_days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Today's date, `YYYY-MM-DD` (UTC).
pub fn today() -> String {
    date(0)
}

/// Now as GitLab formats timestamps: `2024-01-02T03:04:05.678Z`.
pub fn now_iso() -> String {
    let (secs, millis) = unix_now();
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
