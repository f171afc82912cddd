//! Durations as the config writes them: whole numbers with a unit, one or
//! more in a row — `500ms`, `30s`, `5m`, `6h`, `1d`, `1h30m`. Nothing else:
//! no spaces, no fractions, no unit words, and the units in lower case
//! only, so that `5M` cannot mean five months by accident.

use std::time::Duration;

/// The units, longest first where one is a prefix of another.
const UNITS: [(&str, u64); 5] = [
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Reads a duration; the error says what is accepted.
pub(super) fn parse(text: &str) -> Result<Duration, String> {
    // The value itself is not repeated: the caller shows it when it is
    // short enough not to be a secret typed into the wrong field.
    let wrong = || {
        "is not a duration: write whole numbers with a unit \
         (ms, s, m, h, d), e.g. \"500ms\", \"30s\", \"5m\", \"1h30m\""
            .to_string()
    };
    if text.is_empty() {
        return Err(wrong());
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(wrong());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| wrong())?;
        rest = &rest[digits..];
        let (unit, millis) = UNITS
            .iter()
            .find(|(unit, _)| rest.starts_with(unit))
            .ok_or_else(wrong)?;
        rest = &rest[unit.len()..];
        total = number
            .checked_mul(*millis)
            .and_then(|m| total.checked_add(m))
            .ok_or_else(wrong)?;
    }
    Ok(Duration::from_millis(total))
}

/// A duration the way the config writes it (`1h30m`, `500ms`, `0s`).
pub fn format(d: Duration) -> String {
    let mut millis = d.as_millis() as u64;
    if millis == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in UNITS.iter().rev() {
        if millis >= *size {
            out.push_str(&format!("{}{unit}", millis / size));
            millis %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_and_written() {
        let ok = [
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("6h", 21_600_000),
            ("1d", 86_400_000),
            ("1h30m", 5_400_000),
            ("0s", 0),
            ("90s", 90_000),
        ];
        for (text, millis) in ok {
            assert_eq!(parse(text), Ok(Duration::from_millis(millis)), "{text}");
        }
        for bad in [
            "",
            "5",
            "5 minutes",
            "1.5h",
            "5M",
            "5S",
            "-5s",
            "5 s",
            " 5s",
            "5s ",
            "s",
            "5x",
            "h5",
            "5mm",
            "99999999999999999s",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("is not a duration"), "{bad}: {err}");
        }
        for d in [0, 500, 30_000, 90_000, 5_400_000, 86_400_000 + 1] {
            let d = Duration::from_millis(d);
            assert_eq!(parse(&format(d)), Ok(d));
        }
        assert_eq!(format(Duration::from_secs(5400)), "1h30m");
    }
}
