//! Maintainer scripts: what debhelper's systemd and tmpfiles helpers would write, plus the
//! manifest's snippets. Units are enabled and started on install, restarted on upgrade, stopped
//! on removal and forgotten on purge; state directories are removed on purge.

use crate::Manifest;

const HEADER: &str = "#!/bin/sh\nset -e\n";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// (script name, text) for every script the package needs.
pub fn generate(m: &Manifest, units: &[(String, bool, bool)], chmods: &[(String, u32)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let s = &m.scripts;
    let has_units = !units.is_empty();

    if let Some(snippet) = &s.preinst {
        out.push(("preinst".into(), format!("{HEADER}\n{snippet}\n")));
    }

    let mut post = String::from(HEADER);
    post.push_str("\nif [ \"$1\" = configure ] || [ \"$1\" = abort-upgrade ] || [ \"$1\" = abort-deconfigure ] || [ \"$1\" = abort-remove ]; then\n");
    for d in &m.state_dirs {
        post.push_str(&format!("    mkdir -p {}\n", quote(d)));
    }
    for (path, mode) in chmods {
        post.push_str(&format!("    chmod {mode:o} {}\n", quote(path)));
    }
    post.push_str("    :\nfi\n");
    if let Some(snippet) = &s.postinst {
        post.push_str(&format!("\n{snippet}\n"));
    }
    if has_units {
        post.push_str("\nif [ \"$1\" = configure ] || [ \"$1\" = abort-upgrade ] || [ \"$1\" = abort-deconfigure ] || [ \"$1\" = abort-remove ]; then\n");
        for (unit, enable, _) in units {
            let u = quote(unit);
            post.push_str(&format!("    deb-systemd-helper unmask {u} >/dev/null || true\n"));
            if *enable {
                // Enable on first install; afterwards respect what the administrator chose.
                post.push_str(&format!(
                    "    if deb-systemd-helper --quiet was-enabled {u}; then\n        deb-systemd-helper enable {u} >/dev/null || true\n    elif [ -z \"$2\" ]; then\n        deb-systemd-helper enable {u} >/dev/null || true\n    else\n        deb-systemd-helper update-state {u} >/dev/null || true\n    fi\n"
                ));
            } else {
                post.push_str(&format!("    deb-systemd-helper update-state {u} >/dev/null || true\n"));
            }
        }
        post.push_str(
            "    if [ -d /run/systemd/system ]; then\n        systemctl --system daemon-reload >/dev/null || true\n",
        );
        for (unit, _, start) in units.iter().filter(|u| u.2) {
            let _ = start;
            let u = quote(unit);
            post.push_str(&format!(
                "        if [ -n \"$2\" ]; then\n            deb-systemd-invoke restart {u} >/dev/null || true\n        else\n            deb-systemd-invoke start {u} >/dev/null || true\n        fi\n"
            ));
        }
        post.push_str("    fi\nfi\n");
    }
    if post != format!("{HEADER}\nif [ \"$1\" = configure ] || [ \"$1\" = abort-upgrade ] || [ \"$1\" = abort-deconfigure ] || [ \"$1\" = abort-remove ]; then\n    :\nfi\n") {
        out.push(("postinst".into(), post));
    }

    if has_units || s.prerm.is_some() {
        let mut pre = String::from(HEADER);
        if has_units {
            pre.push_str("\nif [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then\n");
            for (unit, _, _) in units {
                pre.push_str(&format!("    deb-systemd-invoke stop {} >/dev/null || true\n", quote(unit)));
            }
            pre.push_str("fi\n");
        }
        if let Some(snippet) = &s.prerm {
            pre.push_str(&format!("\n{snippet}\n"));
        }
        out.push(("prerm".into(), pre));
    }

    if has_units || !m.state_dirs.is_empty() || s.postrm.is_some() {
        let mut rm = String::from(HEADER);
        if let Some(snippet) = &s.postrm {
            rm.push_str(&format!("\n{snippet}\n"));
        }
        if has_units {
            rm.push_str(
                "\nif [ -d /run/systemd/system ]; then\n    systemctl --system daemon-reload >/dev/null || true\nfi\n",
            );
            rm.push_str("if [ \"$1\" = remove ] && command -v deb-systemd-helper >/dev/null; then\n");
            for (unit, _, _) in units {
                rm.push_str(&format!("    deb-systemd-helper mask {} >/dev/null || true\n", quote(unit)));
            }
            rm.push_str("fi\n");
        }
        rm.push_str("if [ \"$1\" = purge ]; then\n");
        for (unit, _, _) in units {
            let u = quote(unit);
            rm.push_str(&format!(
                "    if command -v deb-systemd-helper >/dev/null; then\n        deb-systemd-helper purge {u} >/dev/null || true\n        deb-systemd-helper unmask {u} >/dev/null || true\n    fi\n"
            ));
        }
        for d in &m.state_dirs {
            rm.push_str(&format!("    rm -rf {}\n", quote(d)));
        }
        rm.push_str("    :\nfi\n");
        out.push(("postrm".into(), rm));
    }
    out
}
