//! Configuration helpers shared by the relay and the client: human durations ("10s",
//! "5m", "7d", read by humantime) and a secret string whose `Debug` never prints it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A duration text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// A number without a unit ("3"): seconds or minutes would be a guess.
    #[error("duration {0:?}: add a unit, like 500ms, 10s, 5m, 2h, 7d or 1w")]
    NoUnit(String),
    /// A unit humantime does not know ("5x").
    #[error("duration {text:?}: unknown unit {unit:?}; use ms, s, m, h, d or w, like 500ms, 10s, 5m, 2h, 7d or 1w")]
    UnknownUnit {
        /// The text as given.
        text: String,
        /// The unit found.
        unit: String,
    },
    /// Not a duration, or too large to hold.
    #[error("duration {0:?}: expected a number with a unit, like 500ms, 10s, 5m, 2h, 7d or 1w")]
    Invalid(String),
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `7d`, `1w` and combinations (`1h 30m`), with
/// humantime's unit names. A bare number is refused: its unit would be a guess.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(text.trim()).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => DurationError::NoUnit(text.to_owned()),
        humantime::DurationError::UnknownUnit { unit, .. } => {
            DurationError::UnknownUnit { text: text.to_owned(), unit }
        }
        _ => DurationError::Invalid(text.to_owned()),
    })
}

/// Formats a duration in one unit the way [`parse_duration`] reads it ("90s", "7d").
/// Not humantime's formatter: it counts months as 30.44 days, so 60 days print as
/// "1month 29days 13h 26m 24s".
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= size && s.is_multiple_of(size) {
            return format!("{}{unit}", s / size);
        }
    }
    format!("{s}s")
}

/// A duration in config files, written as text ("10s").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HumanDuration(pub Duration);

impl TryFrom<String> for HumanDuration {
    type Error = DurationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        parse_duration(&value).map(HumanDuration)
    }
}

impl From<HumanDuration> for String {
    fn from(value: HumanDuration) -> Self {
        format_duration(value.0)
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(HumanDuration)
    }
}

/// A secret (join token); `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it must go on the wire or to the user.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration(" 7d ").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("1w").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("5 weeks").unwrap(), Duration::from_secs(5 * 604_800));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("ten"), Err(DurationError::Invalid("ten".into())));
        assert_eq!(parse_duration(""), Err(DurationError::Invalid("".into())));
        assert_eq!(
            parse_duration("5 fortnights").unwrap_err().to_string(),
            "duration \"5 fortnights\": unknown unit \"fortnights\"; use ms, s, m, h, d or w, like 500ms, 10s, 5m, 2h, 7d or 1w"
        );
        for d in ["250ms", "10s", "5m", "2h", "7d", "90s", "0s"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn a_bare_number_needs_a_unit() {
        let err = parse_duration("3").unwrap_err();
        assert_eq!(err, DurationError::NoUnit("3".into()));
        assert_eq!(err.to_string(), "duration \"3\": add a unit, like 500ms, 10s, 5m, 2h, 7d or 1w");
        assert!(matches!(parse_duration("1h 30"), Err(DurationError::NoUnit(_))));
        assert!("3".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "***");
    }
}
