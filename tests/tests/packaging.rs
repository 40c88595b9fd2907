//! Packaging (issue 4): our own .debs and `debfleet package`, inspected with dpkg-deb and
//! lintian, installed into real systemd devices (systemd-nspawn) next to a real Mosquitto.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use debfleet_tests::lab::Device;
use debfleet_tests::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn package(manifest: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin("debfleet"))
        .arg("package")
        .arg(manifest)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("SOURCE_DATE_EPOCH", "1790000000")
        .output()
        .unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb").args(args).arg(deb).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn own_packages_are_well_formed_and_lintian_clean() {
    let agent = own_deb("debfleet-agent");
    let info = dpkg_deb(&["--info"], &agent);
    for want in
        ["Package: debfleet-agent", "X-Debfleet-Units: debfleet-agent.service", "conffiles", "postinst", "postrm"]
    {
        assert!(info.contains(want), "{want} missing from:\n{info}");
    }
    let conffiles = dpkg_deb(&["--ctrl-tarfile"], &agent);
    let _ = conffiles;
    let contents = dpkg_deb(&["--contents"], &agent);
    for want in [
        "./usr/bin/debfleet-agent",
        "./etc/debfleet/agent.toml",
        "./lib/systemd/system/debfleet-agent.service",
        "./usr/share/doc/debfleet-agent/copyright",
    ] {
        assert!(contents.contains(want), "{want} missing from:\n{contents}");
    }
    assert!(contents.lines().all(|l| l.contains("root/root")), "every file root-owned:\n{contents}");
    let repo_contents = dpkg_deb(&["--contents"], &own_deb("debfleet-repo"));
    assert!(repo_contents.contains("./lib/systemd/system/debfleet-repo.service"));
    let console = dpkg_deb(&["--contents"], &own_deb("debfleet"));
    assert!(console.contains("./usr/bin/debfleet"));
    assert!(console.contains("./usr/share/bash-completion/completions/debfleet"), "{console}");
    for (deb, page) in [
        ("debfleet", "debfleet.1.gz"),
        ("debfleet-repo", "debfleet-repo.1.gz"),
        ("debfleet-agent", "debfleet-agent.1.gz"),
    ] {
        let contents = dpkg_deb(&["--contents"], &own_deb(deb));
        assert!(contents.contains(&format!("./usr/share/man/man1/{page}")), "{deb} has no man page:\n{contents}");
    }

    let debs = [agent, own_deb("debfleet-repo"), own_deb("debfleet")];
    let out =
        Command::new("lintian").args(["--no-tag-display-limit"]).args(&debs).output().expect("lintian is installed");
    let report = text(&out);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    assert!(!report.contains("no-manual-page"), "{report}");
}

#[test]
fn builds_are_reproducible() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let manifest = workspace().join("packaging/debfleet-agent/manifest.toml");
    for dir in [&a, &b] {
        let out = package(&manifest, dir.path(), &[]);
        assert!(out.status.success(), "{}", text(&out));
        std::thread::sleep(Duration::from_millis(1100));
    }
    let name = "debfleet-agent_0.1.0_amd64.deb";
    assert_eq!(std::fs::read(a.path().join(name)).unwrap(), std::fs::read(b.path().join(name)).unwrap());
}

fn write_component(dir: &Path, version: &str) -> PathBuf {
    std::fs::write(
        dir.join("demo-beacon"),
        "#!/bin/sh\necho \"beacon $(cat /usr/share/demo-beacon/version) up\" > /run/demo-beacon.state\nexec sleep infinity\n",
    )
    .unwrap();
    std::fs::write(dir.join("demo-beacon.service"), "[Unit]\nDescription=demo beacon\n\n[Service]\nExecStart=/usr/bin/demo-beacon\n\n[Install]\nWantedBy=multi-user.target\n").unwrap();
    std::fs::write(dir.join("version"), format!("{version}\n")).unwrap();
    std::fs::write(dir.join("secret.conf"), "token = 1\n").unwrap();
    let manifest = dir.join("manifest.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"state_dirs = ["/var/lib/demo-beacon"]

[package]
name = "demo-beacon"
version = "{version}"
architecture = "all"
maintainer = "Ops Team <ops@example.com>"
description = """a demo component
It writes its state to /run and waits."""
depends = ["coreutils"]

[[files]]
source = "demo-beacon"
dest = "/usr/bin/demo-beacon"
mode = "0755"

[[files]]
source = "version"
dest = "/usr/share/demo-beacon/version"

[[files]]
source = "secret.conf"
dest = "/etc/demo-beacon/secret.conf"
mode = "0600"

[[units]]
source = "demo-beacon.service"

[scripts]
postinst = "echo installed-by-snippet > /var/lib/demo-beacon/marker"
"#
        ),
    )
    .unwrap();
    manifest
}

#[test]
fn manifest_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_component(dir.path(), "1.0");
    let good = std::fs::read_to_string(&manifest).unwrap();
    for (bad, needle) in [
        (good.replace("name = \"demo-beacon\"", "name = \"Demo Beacon\""), "package.name"),
        (good.replace("version = \"1.0\"", "version = \"one\""), "version"),
        (good.replace("dest = \"/usr/bin/demo-beacon\"", "dest = \"usr/../../bin\""), "dest"),
        (good.replace("depends = [\"coreutils\"]", "depends = [\"coreutils; rm -rf /\"]"), "depends"),
        (good.replace("mode = \"0755\"", "mode = \"rwx\""), "mode"),
        (good.replace("[scripts]", "[bogus]"), "bogus"),
        (good.replace("source = \"demo-beacon.service\"", "source = \"nope.service\""), "nope.service"),
    ] {
        std::fs::write(&manifest, bad).unwrap();
        let out = package(&manifest, dir.path(), &[]);
        assert!(!out.status.success());
        assert!(text(&out).contains(needle), "{needle}: {}", text(&out));
    }
}

const AGENT_CONF: &str = "/etc/debfleet/agent.toml";

#[test]
fn agent_package_lives_through_install_reboot_upgrade_and_purge_on_a_device() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/status", "debfleet/device/+/meta"]);
    let mut dev = Device::boot("pkg-1");
    dev.put(&own_deb("debfleet-agent"), "/var/tmp/agent.deb");
    dev.ok(&["dpkg", "-i", "/var/tmp/agent.deb"]);
    assert!(dev.is_active("debfleet-agent.service"), "active right after install");
    assert_eq!(dev.ok(&["systemctl", "is-enabled", "debfleet-agent.service"]).trim(), "enabled");
    // Point it at the test broker (a conffile edit, as an operator would) and restart.
    let conf = std::fs::read_to_string(dev.root.join(AGENT_CONF.trim_start_matches('/'))).unwrap();
    dev.write(AGENT_CONF, &conf.replace("mqtt://127.0.0.1:1883", &m.url()));
    dev.ok(&["systemctl", "restart", "debfleet-agent.service"]);
    // The device id defaults to the host name.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        obs.wait("debfleet/device/pkg-1/status", Duration::from_secs(30), |v| v["state"] == "online")
    }))
    .is_err()
    {
        panic!(
            "not online; agent journal:\n{}",
            String::from_utf8_lossy(&dev.exec(&["journalctl", "-u", "debfleet-agent", "--no-pager"]).stdout)
        );
    }

    // Under systemd the restart command is honoured: the agent exits and systemd starts it again.
    let first = obs.last("debfleet/device/pkg-1/status").unwrap().json();
    obs.publish("debfleet/device/pkg-1/cmd/restart", r#"{"id":"restart-1"}"#, false);
    wait_for(Duration::from_secs(30), "a new connection after the restart command", || {
        let last = obs.messages().into_iter().rev().find(|m| m.topic == "debfleet/device/pkg-1/status")?.json();
        (last["state"] == "online" && last["since"] != first["since"]).then_some(())
    });
    let journal = dev.ok(&["journalctl", "-u", "debfleet-agent", "--no-pager", "-o", "cat"]);
    assert!(journal.contains("restarting at the operator's request"), "{journal}");

    obs.clear();
    dev.reboot();
    assert!(dev.is_active("debfleet-agent.service"), "active again after a reboot");
    // The shutdown stopped it cleanly (offline), the boot started it again (online).
    obs.wait("debfleet/device/pkg-1/status", Duration::from_secs(30), |v| v["state"] == "offline");
    wait_for(Duration::from_secs(30), "online after the reboot", || {
        let last = obs.messages().into_iter().rev().find(|m| m.topic == "debfleet/device/pkg-1/status")?;
        (last.json()["state"] == "online").then_some(())
    });

    // Upgrade to a newer build: the service restarts on the new version, the edited conffile stays.
    let newer = tempfile::tempdir().unwrap();
    let out =
        package(&workspace().join("packaging/debfleet-agent/manifest.toml"), newer.path(), &["--version", "0.1.1"]);
    assert!(out.status.success(), "{}", text(&out));
    dev.put(&newer.path().join("debfleet-agent_0.1.1_amd64.deb"), "/var/tmp/agent-new.deb");
    let before = dev.ok(&["systemctl", "show", "-p", "ExecMainPID", "--value", "debfleet-agent.service"]);
    dev.ok(&["dpkg", "--force-confold", "-i", "/var/tmp/agent-new.deb"]);
    assert_eq!(dev.ok(&["dpkg-query", "-W", "-f=${Version}", "debfleet-agent"]), "0.1.1");
    assert!(dev.is_active("debfleet-agent.service"));
    let after = dev.ok(&["systemctl", "show", "-p", "ExecMainPID", "--value", "debfleet-agent.service"]);
    assert_ne!(before, after, "restarted on upgrade");
    assert!(std::fs::read_to_string(dev.root.join(AGENT_CONF.trim_start_matches('/'))).unwrap().contains(&m.url()));

    // Remove stops it; purge leaves no state behind.
    dev.ok(&["dpkg", "--purge", "debfleet-agent"]);
    assert!(!dev.is_active("debfleet-agent.service"));
    for gone in [
        "var/lib/debfleet",
        "etc/debfleet/agent.toml",
        "usr/bin/debfleet-agent",
        "etc/systemd/system/multi-user.target.wants/debfleet-agent.service",
    ] {
        // symlink_metadata: the wants/ link points at an absolute path inside the device.
        assert!(dev.root.join(gone).symlink_metadata().is_err(), "{gone} left after purge");
    }
    obs.wait("debfleet/device/pkg-1/status", Duration::from_secs(30), |v| v["state"] == "offline");
}

#[test]
fn a_manifest_package_with_a_unit_runs_on_a_device() {
    let work = tempfile::tempdir().unwrap();
    let manifest = write_component(work.path(), "1.0");
    let out = package(&manifest, work.path(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let deb = work.path().join("demo-beacon_1.0_all.deb");
    let info = dpkg_deb(&["--info"], &deb);
    assert!(info.contains("X-Debfleet-Units: demo-beacon.service"), "{info}");
    let dev = Device::boot("pkg-2");
    dev.put(&deb, "/var/tmp/beacon.deb");
    dev.ok(&["dpkg", "-i", "/var/tmp/beacon.deb"]);
    assert!(dev.is_active("demo-beacon.service"));
    assert_eq!(dev.ok(&["cat", "/run/demo-beacon.state"]).trim(), "beacon 1.0 up");
    assert_eq!(dev.ok(&["cat", "/var/lib/demo-beacon/marker"]).trim(), "installed-by-snippet");
    assert_eq!(dev.ok(&["stat", "-c", "%a", "/etc/demo-beacon/secret.conf"]).trim(), "600");
    dev.ok(&["dpkg", "--purge", "demo-beacon"]);
    assert!(!dev.is_active("demo-beacon.service"));
    assert!(!dev.root.join("var/lib/demo-beacon").exists());
}

#[test]
fn repository_server_package_runs_as_its_own_user_on_a_device() {
    let dev = Device::boot("pkg-3");
    dev.put(&own_deb("debfleet-repo"), "/var/tmp/repo.deb");
    dev.ok(&["dpkg", "-i", "/var/tmp/repo.deb"]);
    assert_eq!(dev.ok(&["stat", "-c", "%U %a", "/var/lib/debfleet-repo"]).trim(), "debfleet-repo 750");
    let token = dev.ok(&["cat", "/var/lib/debfleet-repo/initial-token.txt"]);
    assert!(token.contains("dfr_"), "{token}");
    assert_eq!(dev.ok(&["stat", "-c", "%a", "/var/lib/debfleet-repo/initial-token.txt"]).trim(), "600");
    // The device shares the host's network: move it to a free port, as an operator would.
    let port = free_port();
    dev.write("/etc/default/debfleet-repo", &format!("LISTEN=127.0.0.1:{port}\n"));
    dev.ok(&["systemctl", "restart", "debfleet-repo.service"]);
    assert!(dev.is_active("debfleet-repo.service"));
    let pid = dev.ok(&["systemctl", "show", "-p", "MainPID", "--value", "debfleet-repo.service"]);
    assert_eq!(dev.ok(&["stat", "-c", "%U", &format!("/proc/{}", pid.trim())]).trim(), "debfleet-repo");
    let (code, _) = debfleet_tests::repo::raw_http(
        wait_for(Duration::from_secs(20), "the repository port", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| port)
        }),
        "GET /debfleet-archive-keyring.gpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
        true,
    );
    assert_eq!(code, 200);
    dev.ok(&["dpkg", "--purge", "debfleet-repo"]);
    assert!(!dev.is_active("debfleet-repo.service"));
    assert!(!dev.root.join("var/lib/debfleet-repo").exists(), "purge removes the repository data");
}
