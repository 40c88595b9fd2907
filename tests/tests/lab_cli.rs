//! `debfleet lab` (issue 5): devices that outlive the command, a power cut and a boot, and a
//! teardown that leaves nothing behind.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use debfleet_tests::*;

fn agent_deb() -> PathBuf {
    own_deb("debfleet-agent")
}

#[test]
fn lab_up_kill_boot_exec_down() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/status"]);
    let labdir = tempfile::tempdir().unwrap();
    let lab = |args: &[&str]| {
        let out = Command::new(bin("debfleet"))
            .arg("lab")
            .args(args)
            .env("DEBFLEET_BROKER", m.url())
            .env("DEBFLEET_LAB_DIR", labdir.path())
            .output()
            .unwrap();
        (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (code, text) = lab(&["up", "--devices", "2", "--agent-deb", agent_deb().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    for d in ["lab-1", "lab-2"] {
        obs.wait(&format!("debfleet/device/{d}/status"), Duration::from_secs(60), |v| v["state"] == "online");
    }
    // The devices are in the group the lab put them in.
    let out = Command::new(bin("debfleet"))
        .args(["ping", "--group", "lab", "--json"])
        .env("DEBFLEET_BROKER", m.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (code, text) = lab(&["exec", "lab-1", "dpkg-query", "-W", "-f=${Status}", "debfleet-agent"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("install ok installed"), "{text}");
    let (code, text) = lab(&["exec", "lab-1", "false"]);
    assert_eq!(code, Some(1), "the command's own exit status: {text}");

    // A power cut: the broker marks the device lost; booting it brings it back.
    let (code, text) = lab(&["kill", "lab-2"]);
    assert_eq!(code, Some(0), "{text}");
    obs.wait("debfleet/device/lab-2/status", Duration::from_secs(60), |v| v["state"] == "lost");
    let (_, text) = lab(&["status"]);
    assert!(text.lines().any(|l| l.starts_with("lab-2") && l.contains("off")), "{text}");
    obs.clear();
    let (code, text) = lab(&["boot", "lab-2"]);
    assert_eq!(code, Some(0), "{text}");
    obs.wait("debfleet/device/lab-2/status", Duration::from_secs(60), |v| v["state"] == "online");

    let (code, text) = lab(&["down"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("removed 2"), "{text}");
    assert!(std::fs::read_dir(labdir.path().join("devices")).map(|d| d.count()).unwrap_or(0) == 0);
    for name in ["lab-1", "lab-2"] {
        assert!(
            !std::path::Path::new(&format!("/sys/fs/cgroup/systemd/debfleet-lab-{name}")).exists(),
            "cgroup of {name} left"
        );
    }
    let nspawns = Command::new("pgrep").args(["-f", &format!("-D {}", labdir.path().display())]).output().unwrap();
    assert!(!nspawns.status.success(), "containers left running");
}
