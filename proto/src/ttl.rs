//! Idle TTL values: `"15m"`, `"0"` (unload as soon as idle) or `"never"`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How long an instance may stay loaded with no work before it is unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ttl {
    /// Unload after this much idle time (zero: as soon as the last task ends).
    After(Duration),
    /// Stay loaded until unloaded or evicted for memory.
    Never,
}

impl Ttl {
    /// Time left before expiry for an instance idle for `idle`; `None` for `Never`.
    pub fn left(self, idle: Duration) -> Option<Duration> {
        match self {
            Ttl::After(ttl) => Some(ttl.saturating_sub(idle)),
            Ttl::Never => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid TTL {input:?}: use a duration with a unit (\"90s\", \"15m\", \"1h\"), \"0\" or \"never\"")]
pub struct TtlError {
    input: String,
}

impl FromStr for Ttl {
    type Err = TtlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "never" => Ok(Ttl::Never),
            "0" => Ok(Ttl::After(Duration::ZERO)),
            other => humantime::parse_duration(other)
                .map(Ttl::After)
                .map_err(|_| TtlError {
                    input: text.to_owned(),
                }),
        }
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ttl::Never => f.write_str("never"),
            Ttl::After(d) if d.is_zero() => f.write_str("0"),
            Ttl::After(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl Serialize for Ttl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_zero_and_never() {
        assert_eq!("15m".parse(), Ok(Ttl::After(Duration::from_secs(900))));
        assert_eq!("0".parse(), Ok(Ttl::After(Duration::ZERO)));
        assert_eq!("never".parse(), Ok(Ttl::Never));
        assert!("15".parse::<Ttl>().is_err());
        assert!("soon"
            .parse::<Ttl>()
            .unwrap_err()
            .to_string()
            .contains("never"));
    }

    #[test]
    fn round_trips_through_json() {
        for ttl in [
            Ttl::Never,
            Ttl::After(Duration::ZERO),
            Ttl::After(Duration::from_secs(90)),
        ] {
            let json = serde_json::to_string(&ttl).unwrap();
            assert_eq!(serde_json::from_str::<Ttl>(&json).unwrap(), ttl);
        }
        assert_eq!(
            Ttl::After(Duration::from_secs(90)).left(Duration::from_secs(30)),
            Some(Duration::from_secs(60))
        );
    }
}
