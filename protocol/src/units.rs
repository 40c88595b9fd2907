//! systemd unit names: the one list of unit types debfleet knows, shared by the packaging (which
//! units a package may ship), dpkg's file lists (which units a package owns) and the D-Bus client
//! (which names may reach systemd).

/// Unit file suffixes, as systemd names its unit types.
pub const UNIT_SUFFIXES: [&str; 9] =
    [".service", ".socket", ".timer", ".path", ".mount", ".automount", ".swap", ".target", ".slice"];

/// Whether `name` ends with a unit type's suffix (and has a name before it).
pub fn has_unit_suffix(name: &str) -> bool {
    UNIT_SUFFIXES.iter().any(|k| name.len() > k.len() && name.ends_with(k))
}

/// A unit name as systemd accepts it, checked before it reaches the bus or a file name.
pub fn valid_unit_name(name: &str) -> bool {
    name.len() <= 255
        && has_unit_suffix(name)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

/// systemd's ActiveState of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveState {
    Active,
    Reloading,
    Inactive,
    Failed,
    Activating,
    Deactivating,
    /// `maintenance`, `refreshing`, or what a newer systemd adds.
    #[serde(other)]
    Other,
}

impl ActiveState {
    pub fn parse(s: &str) -> ActiveState {
        match s {
            "active" => ActiveState::Active,
            "reloading" => ActiveState::Reloading,
            "inactive" => ActiveState::Inactive,
            "failed" => ActiveState::Failed,
            "activating" => ActiveState::Activating,
            "deactivating" => ActiveState::Deactivating,
            _ => ActiveState::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ActiveState::Active => "active",
            ActiveState::Reloading => "reloading",
            ActiveState::Inactive => "inactive",
            ActiveState::Failed => "failed",
            ActiveState::Activating => "activating",
            ActiveState::Deactivating => "deactivating",
            ActiveState::Other => "other",
        }
    }

    /// Neither starting nor stopping: what a unit settles in.
    pub fn is_steady(self) -> bool {
        matches!(self, ActiveState::Active | ActiveState::Inactive)
    }

    /// A job on the unit is still going.
    pub fn is_changing(self) -> bool {
        matches!(self, ActiveState::Activating | ActiveState::Deactivating | ActiveState::Reloading)
    }
}

impl std::fmt::Display for ActiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names() {
        for ok in ["a.service", "led-watch.timer", "getty@tty1.service", "data.mount"] {
            assert!(valid_unit_name(ok), "{ok}");
        }
        for bad in [".service", "a.conf", "a b.service", "../x.service", ""] {
            assert!(!valid_unit_name(bad), "{bad}");
        }
    }
}
