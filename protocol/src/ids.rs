//! Identifiers that travel in topic names and file names, validated before use.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Who asked for something (an operator's name, `rollout/ID`), as commands, operation records,
/// desired-state records and rollouts carry it: 1 to 64 characters, none of them control
/// characters. Shown to people, never used in a topic or a path.
pub fn check_by(by: &str) -> Result<(), String> {
    if by.is_empty() || by.chars().count() > 64 || by.chars().any(char::is_control) {
        return Err("by must be 1 to 64 printable characters".into());
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than {max} characters")]
    TooLong { kind: &'static str, value: String, max: usize },
    #[error("{kind} {value:?} must match {pattern}")]
    BadSyntax { kind: &'static str, value: String, pattern: &'static str },
}

fn check(
    kind: &'static str,
    pattern: &'static str,
    value: &str,
    max: usize,
    first: fn(u8) -> bool,
    rest: fn(u8) -> bool,
) -> Result<(), IdError> {
    let bytes = value.as_bytes();
    let Some(&head) = bytes.first() else {
        return Err(IdError::Empty { kind });
    };
    if bytes.len() > max {
        let value = value.chars().take(max + 8).collect();
        return Err(IdError::TooLong { kind, value, max });
    }
    if !first(head) || !bytes[1..].iter().all(|&b| rest(b)) {
        return Err(IdError::BadSyntax { kind, value: value.to_owned(), pattern });
    }
    Ok(())
}

fn lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn name_char(b: u8) -> bool {
    lower_alnum(b) || b == b'_' || b == b'-'
}

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn lower_alnum_dash(b: u8) -> bool {
    lower_alnum(b) || b == b'-'
}

fn lower(b: u8) -> bool {
    b.is_ascii_lowercase()
}

fn op_char(b: u8) -> bool {
    alnum(b) || b == b'_' || b == b'-' || b == b'.'
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $pattern:literal, $max:expr, $first:ident, $rest:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PATTERN: &'static str = $pattern;

            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($kind, $pattern, &value, $max, $first, $rest)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A device's id: `[a-z0-9][a-z0-9_-]{0,62}`.
    DeviceId, "device id", "[a-z0-9][a-z0-9_-]{0,62}", 63, lower_alnum, name_char
);
id_type!(
    /// A group's name: `[a-z0-9][a-z0-9_-]{0,62}`.
    GroupName, "group name", "[a-z0-9][a-z0-9_-]{0,62}", 63, lower_alnum, name_char
);
id_type!(
    /// An operation id chosen by the sender of a command. It becomes a topic level and a file
    /// name on the device, hence the narrow alphabet: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
    OpId, "operation id", "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", 64, alnum, op_char
);
id_type!(
    /// A component's id (`led-strip`): a topic level, a file name and part of its package's
    /// name, `[a-z0-9][a-z0-9-]{0,31}`.
    ComponentId, "component id", "[a-z0-9][a-z0-9-]{0,31}", 32, lower_alnum, lower_alnum_dash
);
id_type!(
    /// A rollout's id: a topic level, `[a-z0-9][a-z0-9-]{0,47}`.
    RolloutId, "rollout id", "[a-z0-9][a-z0-9-]{0,47}", 48, lower_alnum, lower_alnum_dash
);
id_type!(
    /// One of a component's actions (`set-color`): `[a-z][a-z0-9-]{0,31}`.
    ActionName, "action", "[a-z][a-z0-9-]{0,31}", 32, lower, lower_alnum_dash
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(DeviceId::new("lab-1").is_ok());
        assert!(DeviceId::new("a").is_ok());
        assert!(DeviceId::new("a".repeat(63)).is_ok());
        assert!(matches!(DeviceId::new("a".repeat(64)), Err(IdError::TooLong { .. })));
        assert!(matches!(DeviceId::new(""), Err(IdError::Empty { .. })));
        for bad in ["-a", "_a", "A", "a/b", "a+", "a#", "a b", "é"] {
            assert!(matches!(DeviceId::new(bad), Err(IdError::BadSyntax { .. })), "{bad}");
        }
    }

    #[test]
    fn op_ids() {
        assert!(OpId::new("ping-1700000000.123").is_ok());
        assert!(OpId::new("ABC_def").is_ok());
        for bad in [".hidden", "a/b", "../x", "a+b", "a#"] {
            assert!(OpId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn component_ids_and_actions() {
        assert!(ComponentId::new("led-strip").is_ok());
        assert!(ComponentId::new("ros1-bridge").is_ok());
        for bad in ["-a", "Led", "a_b", "a/b", "a+", ""] {
            assert!(ComponentId::new(bad).is_err(), "{bad}");
        }
        assert!(ActionName::new("set-color").is_ok());
        for bad in ["1x", "-x", "X", "a b", "a/b", ""] {
            assert!(ActionName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deserialize_validates() {
        let err = serde_json::from_str::<DeviceId>("\"Bad\"").unwrap_err();
        assert!(err.to_string().contains("must match"));
    }
}
