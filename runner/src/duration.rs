//! Parsing of Go-style durations (`90s`, `5m`, `1h30m`, `1.5h`, `250ms`) and byte sizes (`64MiB`).
//!
//! Clients of the seed product send Go duration strings in `?timeout=`, so the runner accepts
//! exactly that grammar: one or more `<decimal><unit>` pairs with units `ns us µs ms s m h`.

use std::time::Duration;

/// Parses a Go duration string. Zero and negative durations are refused: every duration the
/// runner takes is a time limit or an interval, where zero has no useful meaning.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.starts_with('-') {
        return Err(format!("duration {text:?} must be positive"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut rest = s;
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("duration {text:?}: expected a number at {rest:?}"));
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("duration {text:?}: bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => {
                return Err(format!(
                    "duration {text:?} needs a unit (ns, us, ms, s, m, h), e.g. \"30s\""
                ))
            }
            other => return Err(format!("duration {text:?}: unknown unit {other:?}")),
        };
        total_nanos += number * scale;
    }
    if !total_nanos.is_finite() || total_nanos > 100.0 * 365.0 * 86400e9 {
        return Err(format!("duration {text:?} is too large"));
    }
    if total_nanos < 1.0 {
        return Err(format!("duration {text:?} must be positive"));
    }
    Ok(Duration::from_nanos(total_nanos as u64))
}

/// Parses a byte size: a plain number of bytes, or one with a `K`, `M`, `G` (powers of 1024)
/// suffix, optionally followed by `iB` or `B`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(format!("size {text:?} must start with a number"));
    }
    let n: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("size {text:?} is too large"))?;
    let mult: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" | "k" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        "T" | "TB" | "TiB" => 1 << 40,
        other => return Err(format!("size {text:?}: unknown suffix {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ok = [
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("90s", Duration::from_secs(90)),
            ("1.5h", Duration::from_secs(5400)),
            ("250ms", Duration::from_millis(250)),
            ("2h45m10s", Duration::from_secs(2 * 3600 + 45 * 60 + 10)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "30",
            "-5s",
            "5x",
            "s",
            "0s",
            "1..2s",
            "1e9h999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("5PB").is_err());
    }
}
