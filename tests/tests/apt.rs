//! The apt crate (issue 5) against real apt-get and dpkg on a real systemd device, installing
//! from our own signed repository server.

use debfleet_apt::{Apt, AptError, Op, Spec};
use debfleet_tests::lab::Device;
use debfleet_tests::repo::*;

fn apt_on(dev: &Device) -> Apt {
    let enter = ["nsenter", "-t", &dev.pid.to_string(), "-a", "--"].map(String::from).to_vec();
    Apt {
        apt_get: [enter.clone(), vec!["apt-get".into()]].concat(),
        dpkg: [enter, vec!["dpkg".into()]].concat(),
        lock_timeout_s: 3,
        options: Vec::new(),
    }
}

fn trust(dev: &Device, server: &RepoServer, keyring_from: &RepoServer) {
    dev.put(&keyring_from.root.join("public/debfleet-archive-keyring.gpg"), "/etc/apt/keyrings/debfleet.gpg");
    dev.write(
        "/etc/apt/sources.list.d/debfleet.list",
        &format!("deb [signed-by=/etc/apt/keyrings/debfleet.gpg] {}/ stable main\n", server.url()),
    );
    // Only our repository: the device has no route to a Debian mirror in tests.
    dev.write("/etc/apt/sources.list", "");
    let _ = std::fs::remove_file(dev.root.join("etc/apt/sources.list.d/debian.sources"));
}

fn spec(s: &str) -> Spec {
    Spec::parse(s).unwrap()
}

fn installed(dev: &Device, name: &str) -> Option<String> {
    let out = dev.exec(&["dpkg-query", "-W", "-f=${Status} ${Version}", name]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.strip_prefix("install ok installed ").map(str::to_owned)
}

#[test]
fn transactions_progress_dry_runs_and_typed_errors_on_a_device() {
    let server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    for v in ["1.0", "2.0"] {
        assert!(server.publish(&build_deb(work.path(), "df-hello", v, "all", "", false), "stable").status.success());
    }
    let flaky = build_deb_with_scripts(
        work.path(),
        "df-flaky",
        "1.0",
        "all",
        "",
        false,
        &[("postinst", "[ ! -e /var/tmp/fail-postinst ]")],
    );
    let slow = build_deb_with_scripts(work.path(), "df-slow", "1.0", "all", "", false, &[("preinst", "sleep 12")]);
    let needy = build_deb(work.path(), "df-needy", "1.0", "all", "Depends: df-nowhere (>= 1)\n", false);
    for d in [&flaky, &slow, &needy] {
        assert!(server.publish(d, "stable").status.success());
    }
    let dev = Device::boot("apt-1");
    trust(&dev, &server, &server);
    let apt = apt_on(&dev);
    apt.update().unwrap();

    // Dry run reports exactly what would happen, and changes nothing.
    let changes = apt.simulate(&Op::Install(vec![spec("df-hello")]), false).unwrap();
    assert_eq!(changes.install, vec![("df-hello".to_string(), "2.0".to_string())]);
    assert_eq!(installed(&dev, "df-hello"), None);

    // A pinned install with progress phases.
    let mut events = Vec::new();
    let report = apt.run(&Op::Install(vec![spec("df-hello=1.0")]), false, &mut |p| events.push(p)).unwrap();
    assert_eq!(installed(&dev, "df-hello").as_deref(), Some("1.0"));
    let phases: Vec<&str> = events.iter().map(|p| p.phase.as_str()).collect();
    for want in ["downloading", "unpacking", "configuring"] {
        assert!(phases.contains(&want), "{want} missing from {phases:?}");
    }
    assert!(report.download_bytes > 0);
    // dpkg's own database, read directly.
    let state = debfleet_apt::dpkg::read_packages_state(&dev.root.join("var/lib/dpkg"), &["df-hello".into()]);
    assert_eq!(state["df-hello"].version.as_deref(), Some("1.0"));

    // Upgrade to the newest; roll back with a downgrade.
    let plan = apt.simulate(&Op::Upgrade(vec![spec("df-hello")]), false).unwrap();
    assert_eq!(plan.upgrade, vec![("df-hello".to_string(), "1.0".to_string(), "2.0".to_string())]);
    apt.run(&Op::Upgrade(vec![spec("df-hello")]), false, &mut |_| {}).unwrap();
    assert_eq!(installed(&dev, "df-hello").as_deref(), Some("2.0"));
    apt.run(&Op::Install(vec![spec("df-hello=1.0")]), true, &mut |_| {}).unwrap();
    assert_eq!(installed(&dev, "df-hello").as_deref(), Some("1.0"));

    // Typed errors.
    let err = apt.run(&Op::Install(vec![spec("df-nosuch")]), false, &mut |_| {}).unwrap_err();
    assert!(matches!(err, AptError::PackageNotFound(ref p) if p == "df-nosuch"), "{err:?}");
    let err = apt.run(&Op::Install(vec![spec("df-hello=9.9")]), false, &mut |_| {}).unwrap_err();
    assert!(matches!(err, AptError::VersionNotFound { .. }), "{err:?}");
    let err = apt.run(&Op::Install(vec![spec("df-needy")]), false, &mut |_| {}).unwrap_err();
    assert_eq!(err.code().as_str(), "dependency_conflict", "{err:?}");

    // A failing maintainer script, then recovery once the cause is gone.
    dev.write("/var/tmp/fail-postinst", "");
    let err = apt.run(&Op::Install(vec![spec("df-flaky")]), false, &mut |_| {}).unwrap_err();
    assert_eq!(err.code().as_str(), "maintainer_script_failed", "{err:?}");
    assert!(!dev.ok(&["dpkg", "--audit"]).trim().is_empty(), "dpkg knows it is unfinished");
    std::fs::remove_file(dev.root.join("var/tmp/fail-postinst")).unwrap();
    assert!(apt.recover().unwrap(), "there was something to repair");
    assert_eq!(installed(&dev, "df-flaky").as_deref(), Some("1.0"));
    assert!(!apt.recover().unwrap(), "nothing left to repair");

    // Another apt holds the lock: a clear error after the timeout.
    let mut holder = debfleet_tests::hold_dpkg_lock(&dev, "df-slow");
    let err = apt.run(&Op::Install(vec![spec("df-hello")]), false, &mut |_| {}).unwrap_err();
    assert_eq!(err.code().as_str(), "lock_timeout", "{err:?}");
    let _ = holder.wait();

    // The repository goes away: downloads fail, typed.
    apt.run(&Op::Remove { names: vec![spec("df-hello")], purge: true }, false, &mut |_| {}).unwrap();
    assert_eq!(installed(&dev, "df-hello"), None);
    dev.ok(&["apt-get", "clean"]);
    drop(server);
    let err = apt.run(&Op::Install(vec![spec("df-hello")]), false, &mut |_| {}).unwrap_err();
    assert_eq!(err.code().as_str(), "download_failed", "{err:?}");
}

#[test]
fn a_repository_signed_with_another_key_is_refused() {
    let server = RepoServer::start(&[]);
    let other = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    assert!(server.publish(&build_deb(work.path(), "df-x", "1.0", "all", "", false), "stable").status.success());
    let dev = Device::boot("apt-2");
    trust(&dev, &server, &other);
    let err = apt_on(&dev).update().unwrap_err();
    assert_eq!(err.code().as_str(), "signature_failure", "{err:?}");
}
