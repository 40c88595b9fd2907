//! RFC 3339 timestamps (UTC, millisecond precision) without a date library: the contract only
//! ever needs "now" formatted and our own format read back.

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_unix_ms(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// Exactly `n` ASCII digits (RFC 3339's fixed widths: no sign, no more digits, so nothing
/// overflows and nothing negative slips through).
fn digits(s: &str, n: usize) -> Option<i64> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

/// Reads back a UTC timestamp as written by [`format_unix_ms`] (fraction optional): four-digit
/// years, two-digit fields, a real calendar day.
pub fn parse_unix_ms(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut dp = date.splitn(3, '-');
    let y = digits(dp.next()?, 4)?;
    let m = digits(dp.next()?, 2)? as u32;
    let d = digits(dp.next()?, 2)? as u32;
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, frac),
        None => (time, "0"),
    };
    let mut tp = hms.splitn(3, ':');
    let hh = digits(tp.next()?, 2)?;
    let mm = digits(tp.next()?, 2)?;
    let ss = digits(tp.next()?, 2)?;
    let month_days = match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=12).contains(&m) || !(1..=month_days).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    let days = days_from_civil(y, m, d);
    Some(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000 + ms)
}

/// Now, as Unix milliseconds.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Now, formatted.
pub fn now() -> String {
    format_unix_ms(now_unix_ms())
}

// Howard Hinnant's civil calendar algorithms, proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(1_795_440_000_123), "2026-11-23T13:20:00.123Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(parse_unix_ms("2026-11-23T13:20:00Z"), Some(1_795_440_000_000));
        assert_eq!(parse_unix_ms("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_unix_ms("yesterday"), None);
        assert_eq!(parse_unix_ms("2024-02-29T00:00:00Z"), Some(1_709_164_800_000));
        assert_eq!(parse_unix_ms("2026-02-29T00:00:00Z"), None);
        assert_eq!(parse_unix_ms("2026-04-31T00:00:00Z"), None);
    }

    /// Found by bench/fuzz.sh (the command target, 2026-12-04): years of any length overflowed
    /// the arithmetic (a panic in debug builds, a wrapped, wrong time in release builds) and
    /// signed fields ("-02") were taken as negative times.
    #[test]
    fn fuzz_regressions_huge_years_and_signed_fields() {
        for s in [
            "207954400026-01-23T13:25:00.000Z",
            "20246666666666-01-23T13:25:00.000Z",
            "2026666666666666-01-23T13:25:00.000Z",
            "2026666666666666666-01-23T13:25:00.000Z",
            "402785440006-01-23T03:22:00.000Z",
            "3026-01-23T13:25:-0222222222222229000Z",
            "2026-01-23T13:-5:00Z",
            "+026-01-23T13:25:00Z",
            "2026-1-23T13:25:00Z",
        ] {
            assert_eq!(parse_unix_ms(s), None, "{s}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(ms in 0i64..8_000_000_000_000) {
            prop_assert_eq!(parse_unix_ms(&format_unix_ms(ms)), Some(ms));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_unix_ms(&s);
        }
    }
}
