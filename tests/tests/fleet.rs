//! Device operations end to end (issue 5): a real device (systemd-nspawn) running the agent .deb,
//! a real Mosquitto, our repository server, and the console: install, upgrade, an upgrade whose
//! unit fails and is rolled back automatically, an operator rollback, dry runs, errors, unit
//! restart, uninstall — and the broker's view always equal to dpkg's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use debfleet_tests::lab::Device;
use debfleet_tests::repo::RepoServer;
use debfleet_tests::*;
use serde_json::Value;

/// demo-app at `version`: a service that runs, or (broken) exits at once.
fn demo_app(dir: &Path, version: &str, broken: bool) -> PathBuf {
    debfleet_tests::repo::service_deb(dir, "demo-app", version, broken)
}

struct Lab {
    name: String,
    m: Mosquitto,
    repo: RepoServer,
    dev: Device,
    obs: Observer,
    /// More devices, for operations on several at once.
    others: Vec<(String, Device)>,
}

impl Lab {
    fn console(&self, args: &[&str]) -> (Option<i32>, Value, String) {
        console_result(&self.m.url(), args)
    }

    fn dpkg_version(&self, pkg: &str) -> Option<String> {
        self.dev.dpkg_version(pkg)
    }

    /// The broker's retained view of a device's package (None: not listed as installed).
    fn broker_version_of(&self, device: &str, pkg: &str) -> Option<String> {
        let msg = self.obs.last(&format!("debfleet/device/{device}/state/packages"))?.json();
        let p = &msg["packages"][pkg];
        (p["status"] == "installed").then(|| p["version"].as_str().unwrap().to_owned())
    }

    fn broker_version(&self, pkg: &str) -> Option<String> {
        self.broker_version_of(&self.name, pkg)
    }

    /// On every device, the broker and dpkg agree (the agent publishes state right after each
    /// operation), and both say `expect`.
    fn assert_agree(&self, pkg: &str, expect: Option<&str>) {
        let all = std::iter::once((&self.name, &self.dev)).chain(self.others.iter().map(|(n, d)| (n, d)));
        for (name, dev) in all {
            assert_eq!(dev.dpkg_version(pkg).as_deref(), expect, "dpkg's view of {pkg} on {name}");
            wait_for(Duration::from_secs(10), "the broker to agree with dpkg", || {
                (self.broker_version_of(name, pkg).as_deref() == expect).then_some(())
            });
        }
    }
}

fn setup(name: &str) -> Lab {
    setup_with(name, 30, &[])
}

/// A device with the agent .deb installed, talking to `m`, taking packages from `repo`.
fn provision(name: &str, m: &Mosquitto, repo: &RepoServer, obs: &Observer, lock_timeout_s: u32) -> Device {
    provision_on(Device::boot(name), m, repo, obs, lock_timeout_s)
}

fn provision_on(dev: Device, m: &Mosquitto, repo: &RepoServer, obs: &Observer, lock_timeout_s: u32) -> Device {
    let name = dev.name.clone();
    let config = format!(
        "broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\ngroups = [\"lab\"]\n\n[apt]\nwatch_s = 4\nlock_timeout_s = {}\n",
        m.url(),
        lock_timeout_s
    );
    dev.install_agent(&config, repo);
    obs.wait(&format!("debfleet/device/{name}/status"), Duration::from_secs(30), |v| v["state"] == "online");
    dev
}

fn setup_with(name: &str, lock_timeout_s: u32, more: &[&str]) -> Lab {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let repo = RepoServer::start(&[]);
    let dev = provision(name, &m, &repo, &obs, lock_timeout_s);
    let others = more.iter().map(|n| (n.to_string(), provision(n, &m, &repo, &obs, lock_timeout_s))).collect();
    Lab { m, repo, dev, obs, name: name.to_owned(), others }
}

#[test]
fn dependencies_stay_unmanaged_and_a_failed_undo_says_what_is_installed() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let repo = RepoServer::start(&[]);
    // Its directory's name has a space and shell syntax in it.
    let marker_name = format!("debfleet-pwned-{}", std::process::id());
    let marker = std::env::current_dir().unwrap().join(&marker_name);
    let prefix = format!("debfleet dev $(touch {marker_name}) ");
    let dev = provision_on(Device::boot_in("fl-5", &prefix), &m, &repo, &obs, 30);
    assert!(!marker.exists(), "the lab ran part of its path as a command");
    let lab = Lab { m, repo, dev, obs, name: "fl-5".into(), others: vec![] };
    let work = tempfile::tempdir().unwrap();
    use debfleet_tests::repo::build_deb;
    for deb in [
        build_deb(work.path(), "df-dep", "1.0", "all", "", false),
        build_deb(work.path(), "df-top", "1.0", "all", "Depends: df-dep\n", false),
        demo_app(work.path(), "1.0", false),
        demo_app(work.path(), "2.0", true),
    ] {
        assert!(lab.repo.publish(&deb, "stable").status.success());
    }

    // The dependency is installed and reported in the result, but not adopted.
    let (code, v, text) = lab.console(&["install", "fl-5", "df-top", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let changed: Vec<&str> =
        v[0]["result"]["changes"].as_array().unwrap().iter().map(|c| c["package"].as_str().unwrap()).collect();
    assert_eq!(changed, ["df-dep", "df-top"], "{v}");
    lab.assert_agree("df-top", Some("1.0"));
    let pkgs = lab.obs.last("debfleet/device/fl-5/state/packages").unwrap().json();
    assert!(pkgs["packages"].get("df-dep").is_none(), "a dependency became managed: {pkgs}");

    // 2.0's unit fails and 1.0 is gone from the repository: the undo cannot put it back. The
    // result says so, with what is installed, instead of "the change was undone".
    let (code, _, text) = lab.console(&["install", "fl-5", "demo-app=1.0"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(lab.repo.console(&["unpublish", "demo-app=1.0", "--suite", "stable"]).status.success());
    let (code, v, text) = lab.console(&["upgrade", "fl-5", "demo-app", "--json"]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(v[0]["code"], "undo_failed", "{v}");
    assert_eq!(v[0]["result"]["rolled_back_to"]["demo-app"], "2.0", "{v}");
    assert!(v[0]["error"].as_str().unwrap_or("").contains("demo-app is 2.0 (was 1.0)"), "{v}");
    lab.assert_agree("demo-app", Some("2.0"));
}

#[test]
fn install_upgrade_failed_upgrade_rollback_uninstall() {
    let lab = setup_with("fl-1", 30, &["fl-1b"]);
    let work = tempfile::tempdir().unwrap();
    for v in ["1.0", "2.0"] {
        assert!(lab.repo.publish(&demo_app(work.path(), v, false), "stable").status.success());
    }

    // Install a pinned version (the agent refreshes its indices when apt does not know it yet).
    let (code, v, text) = lab.console(&["install", "fl-1", "fl-1b", "demo-app=1.0", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v[0]["result"]["changes"][0]["after"], "1.0", "{v}");
    assert_eq!(v[1]["result"]["changes"][0]["after"], "1.0", "{v}");
    assert!(v[0]["result"]["download_bytes"].as_u64().unwrap() > 0);
    lab.assert_agree("demo-app", Some("1.0"));
    assert!(lab.dev.is_active("demo-app.service"));
    let units = lab.obs.wait("debfleet/device/fl-1/state/units", Duration::from_secs(10), |v| {
        v["units"]["demo-app.service"]["active"] == "active"
    });
    assert_eq!(units["units"]["demo-app.service"]["package"], "demo-app");
    // The operation streamed its phases on the way.
    let phases: Vec<String> = lab
        .obs
        .messages()
        .iter()
        .filter(|m| m.topic.contains("/op/install-"))
        .filter_map(|m| m.json()["phase"].as_str().map(String::from))
        .collect();
    for want in ["resolving", "downloading", "configuring", "verifying units"] {
        assert!(phases.iter().any(|p| p == want), "{want} missing from {phases:?}");
    }

    // Dry run: says what would change, changes nothing.
    let (code, v, text) = lab.console(&["upgrade", "fl-1", "demo-app", "--dry-run", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["dry_run"], true);
    assert_eq!(v[0]["result"]["changes"][0]["after"], "2.0", "{v}");
    lab.assert_agree("demo-app", Some("1.0"));

    // The devices' apt lists tell what can be upgraded.
    lab.obs.publish("debfleet/device/fl-1/cmd/refresh", r#"{"id":"refresh-1"}"#, false);
    let rec = lab.obs.wait("debfleet/device/fl-1/op/refresh-1", Duration::from_secs(60), |v| v["state"] == "succeeded");
    assert_eq!(rec["result"]["upgradable"]["demo-app"]["candidate"], "2.0", "{rec}");

    // Upgrade both (one publish to their group) to the newest.
    let (code, v, text) = lab.console(&["upgrade", "--group", "lab", "demo-app", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(
        (v[0]["result"]["changes"][0]["before"].clone(), v[0]["result"]["changes"][0]["after"].clone()),
        ("1.0".into(), "2.0".into())
    );
    lab.assert_agree("demo-app", Some("2.0"));

    // 3.0's unit fails: the agent notices and goes back to 2.0 by itself.
    assert!(lab.repo.publish(&demo_app(work.path(), "3.0", true), "stable").status.success());
    let (code, v, text) = lab.console(&["upgrade", "--group", "lab", "demo-app", "--json"]);
    assert_eq!(code, Some(1), "{text}");
    for d in v.as_array().unwrap() {
        assert_eq!(d["code"], "unit_failed", "{v}");
        assert_eq!(d["result"]["rolled_back_to"]["demo-app"], "2.0", "{v}");
    }
    lab.assert_agree("demo-app", Some("2.0"));
    wait_for(Duration::from_secs(20), "demo-app to run again", || lab.dev.is_active("demo-app.service").then_some(()));

    // The operator rolls back further: to what was installed before 2.0.
    let (code, v, text) = lab.console(&["rollback", "fl-1", "fl-1b", "demo-app", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["changes"][0]["after"], "1.0", "{v}");
    lab.assert_agree("demo-app", Some("1.0"));

    // A version the repository does not have, a hostile name: clear errors, nothing changes.
    let (code, v, _) = lab.console(&["install", "fl-1", "demo-app=9.9", "--json"]);
    assert_eq!((code, v[0]["code"].clone()), (Some(1), Value::from("version_not_found")));
    let (code, _, text) = lab.console(&["install", "fl-1", "demo-app;reboot"]);
    assert_eq!(code, Some(2), "{text}");
    lab.assert_agree("demo-app", Some("1.0"));

    // Unit control over D-Bus: managed units only.
    let before = lab.dev.ok(&["systemctl", "show", "-p", "ExecMainPID", "--value", "demo-app.service"]);
    let (code, _, text) = lab.console(&["restart", "fl-1", "demo-app.service"]);
    assert_eq!(code, Some(0), "{text}");
    assert_ne!(lab.dev.ok(&["systemctl", "show", "-p", "ExecMainPID", "--value", "demo-app.service"]), before);
    let (code, _, text) = lab.console(&["restart", "fl-1", "dbus.service"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not a unit of a managed package"), "{text}");

    // Uninstall with purge.
    let (code, v, text) = lab.console(&["uninstall", "fl-1", "fl-1b", "demo-app", "--purge", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["changes"][0]["before"], "1.0");
    assert_eq!(v[1]["result"]["changes"][0]["before"], "1.0");
    assert_eq!(lab.dpkg_version("demo-app"), None);
    assert_eq!(lab.others[0].1.dpkg_version("demo-app"), None);
    assert!(!lab.dev.is_active("demo-app.service"));
}

fn slow_pkg(dir: &Path, version: &str) -> PathBuf {
    debfleet_tests::repo::build_deb_with_scripts(dir, "df-slow", version, "all", "", false, &[("postinst", "sleep 6")])
}

fn wait_postinst() {
    wait_for(Duration::from_secs(60), "dpkg to run df-slow's postinst", || {
        // The device's processes are visible from the host.
        let out = Command::new("pgrep").args(["-f", "df-slow.postinst"]).output().unwrap();
        out.status.success().then_some(())
    });
}

#[test]
fn agent_killed_mid_install_and_broker_restarted_mid_upgrade() {
    let mut lab = setup("fl-2");
    let work = tempfile::tempdir().unwrap();
    assert!(lab.repo.publish(&slow_pkg(work.path(), "1.0"), "stable").status.success());

    // SIGKILL of the agent while dpkg configures the package (systemd then stops the rest of
    // the service, dpkg included, and starts the agent again).
    lab.obs.publish("debfleet/device/fl-2/cmd/install", r#"{"id":"crash-1","packages":["df-slow"]}"#, false);
    wait_postinst();
    lab.dev.ok(&["systemctl", "kill", "--kill-whom=main", "--signal=KILL", "debfleet-agent"]);
    let rec = lab.obs.wait("debfleet/device/fl-2/op/crash-1", Duration::from_secs(90), |v| {
        v["state"] == "failed" || v["state"] == "succeeded"
    });
    assert_eq!(rec["error"]["code"], "interrupted", "{rec}");
    // dpkg was repaired on the agent's start and the broker says what dpkg says.
    assert_eq!(lab.dev.ok(&["dpkg", "--audit"]).trim(), "");
    lab.assert_agree("df-slow", Some("1.0"));

    // The broker restarts (without persistence) in the middle of an upgrade: the result and
    // the state arrive after the agent reconnects.
    assert!(lab.repo.publish(&slow_pkg(work.path(), "2.0"), "stable").status.success());
    lab.obs.publish(
        "debfleet/device/fl-2/cmd/upgrade",
        r#"{"id":"broker-1","packages":["df-slow"],"watch_s":0}"#,
        false,
    );
    wait_postinst();
    lab.m.restart();
    lab.obs = Observer::connect(lab.m.port, &["debfleet/device/fl-2/#"]);
    let rec = lab.obs.wait("debfleet/device/fl-2/op/broker-1", Duration::from_secs(90), |v| {
        v["state"] == "succeeded" || v["state"] == "failed"
    });
    assert_eq!(rec["state"], "succeeded", "{rec}");
    lab.assert_agree("df-slow", Some("2.0"));
}

#[test]
fn lock_held_wrong_key_and_power_cut_mid_dpkg() {
    let mut lab = setup_with("fl-3", 3, &[]);
    let work = tempfile::tempdir().unwrap();
    let pre = debfleet_tests::repo::build_deb_with_scripts(
        work.path(),
        "df-holder",
        "1.0",
        "all",
        "",
        false,
        &[("preinst", "sleep 12")],
    );
    assert!(lab.repo.publish(&pre, "stable").status.success());
    assert!(lab.repo.publish(&slow_pkg(work.path(), "1.0"), "stable").status.success());
    assert!(lab.repo.publish(&demo_app(work.path(), "1.0", false), "stable").status.success());
    lab.dev.ok(&["apt-get", "update", "-q"]);

    // Another apt holds the dpkg lock longer than the agent waits.
    let mut holder = debfleet_tests::hold_dpkg_lock(&lab.dev, "df-holder");
    let (code, v, text) = lab.console(&["install", "fl-3", "demo-app", "--json"]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(v[0]["code"], "lock_timeout", "{v}");
    let _ = holder.wait();
    lab.assert_agree("demo-app", None);

    // A repository signed with a key the device does not trust.
    let other = RepoServer::start(&[]);
    lab.dev.put(&other.root.join("public/debfleet-archive-keyring.gpg"), "/etc/apt/keyrings/debfleet.gpg");
    let (code, v, text) = lab.console(&["upgrade", "fl-3", "demo-app", "--json"]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(v[0]["code"], "signature_failure", "{v}");
    lab.dev.put(&lab.repo.root.join("public/debfleet-archive-keyring.gpg"), "/etc/apt/keyrings/debfleet.gpg");

    // The power goes while dpkg configures a package; the device boots again and the agent
    // repairs dpkg and finishes the operation.
    lab.obs.publish("debfleet/device/fl-3/cmd/install", r#"{"id":"cut-1","packages":["df-slow"]}"#, false);
    wait_postinst();
    lab.dev.power_cut();
    lab.obs.wait("debfleet/device/fl-3/status", Duration::from_secs(60), |v| v["state"] == "lost");
    let dir = lab.dev.dir.clone();
    let name = lab.dev.name.clone();
    // Boot the same root again (the test handle keeps owning the directory).
    let rebooted = debfleet_lab::Device::create(&name, &dir).unwrap();
    let rec = lab.obs.wait("debfleet/device/fl-3/op/cut-1", Duration::from_secs(120), |v| {
        v["state"] == "failed" || v["state"] == "succeeded"
    });
    assert_eq!(rec["error"]["code"], "interrupted", "{rec}");
    assert_eq!(rebooted.ok(&["dpkg", "--audit"]).unwrap().trim(), "");
    let version =
        String::from_utf8_lossy(&rebooted.exec(&["dpkg-query", "-W", "-f=${Status} ${Version}", "df-slow"]).stdout)
            .into_owned();
    let dpkg = version.strip_prefix("install ok installed ").map(str::to_owned);
    wait_for(Duration::from_secs(20), "the broker to agree with dpkg after the power cut", || {
        (lab.broker_version("df-slow") == dpkg).then_some(())
    });
    let mut rebooted = rebooted;
    rebooted.power_cut();
}

#[test]
fn the_agent_upgrades_its_own_package() {
    let lab = setup("fl-4");
    let work = tempfile::tempdir().unwrap();
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("packaging/debfleet-agent/manifest.toml");
    let out = Command::new(bin("debfleet"))
        .arg("package")
        .arg(&manifest)
        .args(["--version", "0.1.1", "--out"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let newer = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap();
    assert!(lab.repo.publish(&newer, "stable").status.success());
    let first = lab.obs.last("debfleet/device/fl-4/status").unwrap().json();

    // The transaction runs in a transient unit; the package's postinst restarts the agent, and
    // the new agent reports the result.
    let (code, v, text) = lab.console(&["upgrade", "fl-4", "debfleet-agent", "--json", "--timeout", "180"]);
    assert_eq!(code, Some(0), "{text}");
    let change = v[0]["result"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["package"] == "debfleet-agent")
        .cloned()
        .unwrap();
    assert_eq!((change["before"].clone(), change["after"].clone()), ("0.1.0".into(), "0.1.1".into()), "{v}");
    assert_eq!(lab.dpkg_version("debfleet-agent").as_deref(), Some("0.1.1"));
    assert!(lab.dev.is_active("debfleet-agent.service"));
    let now = lab.obs.last("debfleet/device/fl-4/status").unwrap().json();
    assert_eq!(now["state"], "online");
    assert_ne!(now["since"], first["since"], "the agent was restarted by its own upgrade");
    // The transient unit is gone once its result was read.
    let units = lab.dev.ok(&["systemctl", "list-units", "--all", "--no-legend", "debfleet-op-*"]);
    assert!(units.trim().is_empty(), "{units}");
}

/// (method, fallback reason, bytes fetched for packages, full cost) of a device's package result.
fn fetch_of(result: &Value) -> (String, String, u64, u64) {
    let f = &result["fetches"][0];
    (
        f["method"].as_str().unwrap_or_default().to_owned(),
        f["fallback"]["reason"].as_str().unwrap_or_default().to_owned(),
        result["download_bytes"].as_u64().unwrap_or_default(),
        result["full_bytes"].as_u64().unwrap_or_default(),
    )
}

fn outcome_of<'a>(v: &'a Value, device: &str) -> &'a Value {
    v.as_array().unwrap().iter().find(|o| o["id"] == device).unwrap_or_else(|| panic!("{device} in {v}"))
}

/// Waits until the repository lists a delta of df-bulky from `from` to `to`.
fn wait_delta(lab: &Lab, from: &str, to: &str) -> PathBuf {
    let index = lab.repo.root.join("public/dists/stable/main/binary-amd64/Deltas");
    let file = wait_for(Duration::from_secs(60), &format!("the delta {from} -> {to}"), || {
        let text = std::fs::read_to_string(&index).unwrap_or_default();
        text.split("\n\n")
            .find(|s| s.contains(&format!("From-Version: {from}\nTo-Version: {to}\n")))
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Filename: ")).map(str::to_owned))
    });
    lab.repo.root.join("public").join(file)
}

/// What dpkg holds about a package and its files, to compare two devices.
fn dpkg_state(dev: &Device, pkg: &str) -> String {
    let status = dev.ok(&["dpkg-query", "-s", pkg]);
    let md5sums = dev.ok(&["cat", &format!("/var/lib/dpkg/info/{pkg}.md5sums")]);
    let verify = dev.ok(&["dpkg", "--verify", pkg]);
    let files = dev.ok(&["sh", "-c", &format!("dpkg -L {pkg} | sort | xargs -d '\\n' sha256sum 2>/dev/null || true")]);
    format!("{status}\n{md5sums}\nverify: [{verify}]\n{files}")
}

#[test]
fn upgrades_come_by_delta_and_fall_back_whole_when_a_delta_does_not_fit() {
    let mut lab = setup_with("fl-d1", 30, &["fl-d2"]);
    let work = tempfile::tempdir().unwrap();
    let deb = |v: &str| debfleet_tests::repo::bulky_deb(work.path(), "df-bulky", v);
    // fl-d2 fetches whole packages: the reference the delta path must end identical to.
    {
        let d2 = &lab.others[0].1;
        let conf = d2.ok(&["cat", "/etc/debfleet/agent.toml"]);
        d2.write("/etc/debfleet/agent.toml", &format!("{conf}\n[deltas]\nenabled = false\n"));
        d2.ok(&["systemctl", "restart", "debfleet-agent"]);
        lab.obs.wait("debfleet/device/fl-d2/status", Duration::from_secs(30), |v| v["state"] == "online");
    }
    assert!(lab.repo.publish(&deb("1.0"), "stable").status.success());
    let (code, _, text) = lab.console(&["install", "--group", "lab", "df-bulky=1.0", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    lab.dev.ok(&["test", "-f", "/var/lib/debfleet/debs/df-bulky_1.0_all.deb"]);

    // By delta on fl-d1, whole on fl-d2; the same dpkg state on both.
    assert!(lab.repo.publish(&deb("2.0"), "stable").status.success());
    wait_delta(&lab, "1.0", "2.0");
    let (code, v, text) = lab.console(&["upgrade", "--group", "lab", "df-bulky", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let (method, _, fetched, full) = fetch_of(&outcome_of(&v, "fl-d1")["result"]);
    assert_eq!(method, "delta", "{v}");
    assert!(fetched * 3 < full, "fetched {fetched} of {full}: {v}");
    // Whole: the package's bytes are what it cost, and all the packages cost.
    let r2 = &outcome_of(&v, "fl-d2")["result"];
    assert_eq!(r2["fetches"][0]["method"], "full", "{v}");
    assert!(r2["download_bytes"].as_u64().unwrap() > 0 && r2["download_bytes"] == r2["fetches"][0]["bytes"], "{v}");
    assert_eq!(r2["fetches"][0]["bytes"], r2["fetches"][0]["full_bytes"], "{v}");
    lab.assert_agree("df-bulky", Some("2.0"));
    assert_eq!(dpkg_state(&lab.dev, "df-bulky"), dpkg_state(&lab.others[0].1, "df-bulky"));
    // The reference has served; the rest concerns fl-d1 alone.
    drop(lab.others.pop());
    let (code, _, table) = lab.console(&["upgrade", "fl-d1", "df-bulky"]);
    assert_eq!(code, Some(0), "{table}");
    let (_, _, show) = lab.console(&["show", "fl-d1"]);
    assert!(show.contains("TRANSFER") && show.contains("1 package(s) by delta"), "{show}");

    // A tampered delta is refused; the package comes whole and the result says why.
    assert!(lab.repo.publish(&deb("3.0"), "stable").status.success());
    let file = wait_delta(&lab, "2.0", "3.0");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let (code, v, text) = lab.console(&["upgrade", "fl-d1", "df-bulky", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let (method, reason, _, _) = fetch_of(&v[0]["result"]);
    assert_eq!((method.as_str(), reason.as_str()), ("full", "delta_invalid"), "{v}");
    lab.assert_agree("df-bulky", Some("3.0"));

    // No kept copy of the installed version: whole.
    lab.dev.ok(&["sh", "-c", "rm -f /var/lib/debfleet/debs/*"]);
    assert!(lab.repo.publish(&deb("4.0"), "stable").status.success());
    wait_delta(&lab, "3.0", "4.0");
    let (_, v, text) = lab.console(&["upgrade", "fl-d1", "df-bulky", "--json"]);
    assert_eq!(fetch_of(&v[0]["result"]).1, "no_base", "{text}");
    lab.assert_agree("df-bulky", Some("4.0"));

    // The kept copy is not the delta's base (another payload under its name): whole.
    lab.dev.ok(&["test", "-f", "/var/lib/debfleet/debs/df-bulky_4.0_all.deb"]);
    lab.dev.put(&deb("3.5"), "/var/lib/debfleet/debs/df-bulky_4.0_all.deb");
    assert!(lab.repo.publish(&deb("5.0"), "stable").status.success());
    wait_delta(&lab, "4.0", "5.0");
    let (_, v, text) = lab.console(&["upgrade", "fl-d1", "df-bulky", "--json"]);
    assert_eq!(fetch_of(&v[0]["result"]).1, "base_mismatch", "{text}");
    lab.assert_agree("df-bulky", Some("5.0"));

    // A partial download is resumed with a Range request.
    assert!(lab.repo.publish(&deb("6.0"), "stable").status.success());
    let file = wait_delta(&lab, "5.0", "6.0");
    let bytes = std::fs::read(&file).unwrap();
    let sha = debfleet_tests::sha256_hex(&bytes);
    let part = work.path().join("part");
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    lab.dev.put(&part, &format!("/var/lib/debfleet/fetch/{}.debdelta", &sha[..32]));
    let (code, v, text) = lab.console(&["upgrade", "fl-d1", "df-bulky", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(fetch_of(&v[0]["result"]).0, "delta", "{v}");
    let log = lab.repo.log();
    assert!(log.lines().any(|l| l.contains(".debdelta bytes=") && l.contains(" 206 ")), "a Range request: {log}");
    lab.assert_agree("df-bulky", Some("6.0"));

    // The power goes between the download and the rebuild: the next start ends the operation.
    lab.dev.write(
        "/etc/systemd/system/debfleet-agent.service.d/hold.conf",
        "[Service]\nEnvironment=DEBFLEET_AGENT_APPLY_DELAY_MS=60000\n",
    );
    lab.dev.ok(&["systemctl", "daemon-reload"]);
    lab.dev.ok(&["systemctl", "restart", "debfleet-agent"]);
    lab.obs.wait("debfleet/device/fl-d1/status", Duration::from_secs(30), |v| v["state"] == "online");
    assert!(lab.repo.publish(&deb("7.0"), "stable").status.success());
    let file = wait_delta(&lab, "6.0", "7.0");
    let served = format!("{} 200", file.file_name().unwrap().to_string_lossy());
    lab.obs.publish("debfleet/device/fl-d1/cmd/upgrade", r#"{"id":"cut-delta","packages":["df-bulky"]}"#, false);
    wait_for(Duration::from_secs(60), "the delta to be downloaded", || {
        let fetch = lab.dev.ok(&["ls", "/var/lib/debfleet/fetch"]);
        lab.repo.log().contains(&served).then_some(fetch)
    });
    lab.dev.power_cut();
    lab.obs.wait("debfleet/device/fl-d1/status", Duration::from_secs(60), |v| v["state"] == "lost");
    let (dir, name) = (lab.dev.dir.clone(), lab.dev.name.clone());
    let mut rebooted = debfleet_lab::Device::create(&name, &dir).unwrap();
    let rec = lab.obs.wait("debfleet/device/fl-d1/op/cut-delta", Duration::from_secs(120), |v| {
        v["state"] == "failed" || v["state"] == "succeeded"
    });
    assert_eq!(rec["error"]["code"], "interrupted", "{rec}");
    assert_eq!(rebooted.ok(&["dpkg", "--audit"]).unwrap().trim(), "");
    rebooted.power_cut();
}
