//! Parsing of the sizes and durations users type on the command line.
//!
//! Sizes are binary, as the seeds count them: `1K` = 1,024 bytes, `1G` =
//! 1,073,741,824 (the "gigabyte" tcp_deadlock.py is asked to send).
//! Durations are a bare number of seconds (`2`, `0.5`) or humantime
//! (`500ms`, `2s`, `1m`).

use std::time::Duration;

/// Parses `1024`, `64K`, `64KiB`, `1M`, `1G`, `1.5M`: binary units.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let cfg = parse_size::Config::new().with_binary();
    cfg.parse_size(s.trim())
        .map_err(|e| format!("invalid size '{s}': {e} (examples: 4096, 64K, 1M, 1G)"))
}

/// A size that must be at least 1.
pub fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!("invalid size '{s}': must be greater than zero")),
        n => Ok(n),
    }
}

/// A size for a buffer or socket option: at least 1, at most 1 GiB.
pub fn parse_buffer_size(s: &str) -> Result<usize, String> {
    let n = parse_nonzero_size(s)?;
    if n > 1 << 30 {
        return Err(format!("invalid size '{s}': at most 1G"));
    }
    Ok(n as usize)
}

/// The longest duration any flag takes: a year. Longer ones are typing
/// mistakes, and adding them to a clock could overflow it.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `2` (seconds), `0.25`, `500ms`, `2s`, `1m 30s`; at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let too_long = || format!("invalid duration '{s}': at most 365 days (365d)");
    let d = if let Ok(secs) = t.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return Err(format!(
                "invalid duration '{s}': must be zero or more seconds"
            ));
        }
        if secs > MAX_DURATION.as_secs_f64() {
            return Err(too_long());
        }
        Duration::from_secs_f64(secs)
    } else {
        humantime::parse_duration(t).map_err(|e| match e {
            humantime::DurationError::NumberOverflow => too_long(),
            e => format!("invalid duration '{s}': {e} (examples: 2, 0.5, 500ms, 1m)"),
        })?
    };
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// A duration that must be greater than zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("invalid duration '{s}': must be greater than zero")),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded_never_a_panic() {
        for big in [
            "99999999999999999999",
            "1e19",
            "1e300",
            "366d",
            "99999999999999999999s",
            "400days",
        ] {
            let e = parse_duration(big).unwrap_err();
            assert!(e.contains("at most 365 days"), "{big}: {e}");
        }
        assert_eq!(parse_duration("365d").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32").unwrap(), 32);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("lots").unwrap_err().contains("examples"));
        assert!(
            parse_nonzero_size("0")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(parse_buffer_size("2G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("-3").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_positive_duration("0").is_err());
    }
}
