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
