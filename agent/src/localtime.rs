//! The device's local time, for install windows (`02:00-04:00` means the device's clock).

/// Seconds east of UTC of the local time zone (`TZ`, else `/etc/localtime`) at `unix_s`;
/// 0 when the C library cannot say.
pub fn utc_offset_s(unix_s: i64) -> i64 {
    let t = unix_s as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value; localtime_r writes only into it, and both
    // pointers are valid for the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if ok {
        i64::from(tm.tm_gmtoff as i32)
    } else {
        0
    }
}

/// Minutes after local midnight at `unix_ms`, with the zone's offset given by `offset`.
pub fn minute_of_day(unix_ms: i64, offset: fn(i64) -> i64) -> u16 {
    let local_s = unix_ms.div_euclid(1000) + offset(unix_ms.div_euclid(1000));
    (local_s.rem_euclid(86_400) / 60) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_moves_the_minute() {
        // 2026-12-04T01:30:00Z
        let t = 1_796_347_800_000;
        assert_eq!(minute_of_day(t, |_| 0), 90);
        assert_eq!(minute_of_day(t, |_| 3600), 150);
        assert_eq!(minute_of_day(t, |_| -7200), 23 * 60 + 30);
        // Whatever zone this machine has, the answer is a minute of a day.
        assert!(minute_of_day(t, utc_offset_s) < 1440);
    }
}
