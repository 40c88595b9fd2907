//! Desired state on real devices (issue 14): records a console publishes, the agent converging
//! with real apt and systemd, a device that was away converging when it comes back, a device
//! entry over its group's, a version whose unit fails (blocked, not retried), drift, removal,
//! hostile records that change nothing, and an install window in the device's local time.

use std::time::Duration;

use debfleet_tests::lab::Device;
use debfleet_tests::repo::{service_deb, RepoServer};
use debfleet_tests::*;
use serde_json::Value;

fn console(m: &Mosquitto, args: &[&str]) -> (Option<i32>, Value, String) {
    console_result(&m.url(), args)
}

/// The first report of the device published after message number `from` that `pred` accepts.
fn report_after(obs: &Observer, dev: &str, from: usize, pred: impl Fn(&Value) -> bool) -> Value {
    let topic = format!("debfleet/device/{dev}/state/desired");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let reports: Vec<Value> =
            obs.messages()[from..].iter().filter(|m| m.topic == topic).map(|m| m.json()).collect();
        if let Some(r) = reports.iter().find(|r| pred(r)) {
            return r.clone();
        }
        // On a timeout, what the device did say (and its operations) tell why.
        if std::time::Instant::now() > deadline {
            let ops: Vec<String> = obs.messages()[from..]
                .iter()
                .filter(|m| m.topic.starts_with(&format!("debfleet/device/{dev}/op/")))
                .map(|m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload)))
                .collect();
            panic!("timed out waiting for {dev}'s desired-state report; it said {reports:?}; operations: {ops:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the device's report to say `state` at these revisions (after message `from`).
fn report(obs: &Observer, dev: &str, from: usize, state: &str, revisions: Value) -> Value {
    report_after(obs, dev, from, |v| v["state"] == state && v["revisions"] == revisions)
}

/// Restarts the device's agent and waits until it says it is online again.
fn restart_agent(obs: &Observer, dev: &Device, name: &str) {
    let mark = obs.messages().len();
    dev.ok(&["systemctl", "restart", "debfleet-agent"]);
    let topic = format!("debfleet/device/{name}/status");
    wait_for(Duration::from_secs(30), "the agent back online", || {
        obs.messages()[mark..].iter().any(|m| m.topic == topic && m.json()["state"] == "online").then_some(())
    });
}

fn provision(name: &str, m: &Mosquitto, repo: &RepoServer, obs: &Observer) -> Device {
    let dev = Device::boot(name);
    let config = format!(
        "broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\ngroups = [\"lab\"]\n\n[apt]\nwatch_s = 4\n",
        m.url()
    );
    dev.install_agent(&config, repo);
    obs.wait(&format!("debfleet/device/{name}/status"), Duration::from_secs(30), |v| v["state"] == "online");
    dev
}

#[test]
fn devices_converge_on_desired_state_also_after_being_away() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let repo = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    for (v, broken) in [("1.0", false), ("2.0", false), ("3.0", true)] {
        assert!(repo.publish(&service_deb(work.path(), "ds-app", v, broken), "stable").status.success());
    }
    let d1 = provision("ds-1", &m, &repo, &obs);
    let d2 = provision("ds-2", &m, &repo, &obs);

    // ds-2 is away when the group's record is set.
    d2.ok(&["systemctl", "stop", "debfleet-agent"]);
    obs.wait("debfleet/device/ds-2/status", Duration::from_secs(30), |v| v["state"] == "offline");
    let mark = obs.messages().len();
    let (code, v, text) = console(&m, &["desired", "set", "--group", "lab", "ds-app=1.0", "--by", "ana", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!((v["record"].as_str(), v["revision"].as_u64()), (Some("group/lab"), Some(1)), "{v}");
    let r = report(&obs, "ds-1", mark, "converged", serde_json::json!({"group/lab": 1}));
    assert_eq!(r["packages"]["ds-app"], "1.0");
    assert_eq!(d1.dpkg_version("ds-app").as_deref(), Some("1.0"));
    // The convergence was an ordinary operation, with its record.
    let ops: Vec<Value> = obs
        .messages()
        .iter()
        .filter(|m| m.topic.starts_with("debfleet/device/ds-1/op/desired-") && !m.payload.is_empty())
        .map(|m| m.json())
        .collect();
    assert!(ops.iter().any(|o| o["state"] == "succeeded" && o["verb"] == "install"), "{ops:?}");
    let (code, v, text) = console(&m, &["desired", "show", "--group", "lab", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v["records"]["group/lab"]["by"], "ana", "{v}");
    assert_eq!(v["devices"]["ds-1"]["state"], "converged", "{v}");
    assert_eq!(v["devices"]["ds-2"]["state"], "pending", "{v}");
    let (_, _, table) = console(&m, &["desired", "show"]);
    assert!(table.contains("group/lab") && table.contains("ds-app=1.0"), "{table}");

    // It comes back and converges.
    let mark = obs.messages().len();
    d2.ok(&["systemctl", "start", "debfleet-agent"]);
    report(&obs, "ds-2", mark, "converged", serde_json::json!({"group/lab": 1}));
    assert_eq!(d2.dpkg_version("ds-app").as_deref(), Some("1.0"));

    // A device's own entry wins over its group's.
    let mark = obs.messages().len();
    let (code, _, text) = console(&m, &["desired", "set", "ds-1", "ds-app=2.0"]);
    assert_eq!(code, Some(0), "{text}");
    report(&obs, "ds-1", mark, "converged", serde_json::json!({"device": 1, "group/lab": 1}));
    assert_eq!(d1.dpkg_version("ds-app").as_deref(), Some("2.0"));

    // The group moves to a version whose unit fails: ds-2 tries once, is put back and reports
    // why; ds-1 keeps its own entry.
    let mark = obs.messages().len();
    let (code, _, text) = console(&m, &["desired", "set", "--group", "lab", "ds-app=3.0"]);
    assert_eq!(code, Some(0), "{text}");
    let r = report(&obs, "ds-2", mark, "blocked", serde_json::json!({"group/lab": 2}));
    assert_eq!(r["error"]["code"], "unit_failed", "{r}");
    assert_eq!(d2.dpkg_version("ds-app").as_deref(), Some("1.0"));
    report(&obs, "ds-1", mark, "converged", serde_json::json!({"device": 1, "group/lab": 2}));
    assert_eq!(d1.dpkg_version("ds-app").as_deref(), Some("2.0"));
    // Not retried behind the operator's back (a restart judges again, and finds it failed).
    let attempts = |obs: &Observer| {
        obs.messages()
            .iter()
            .filter(|m| m.topic.starts_with("debfleet/device/ds-2/op/desired-") && m.json()["state"] == "running")
            .count()
    };
    let before = attempts(&obs);
    restart_agent(&obs, &d2, "ds-2");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(attempts(&obs), before, "the failed target ran again");
    let (_, v, _) = console(&m, &["desired", "show", "ds-2", "--json"]);
    assert_eq!(v["devices"]["ds-2"]["state"], "blocked", "{v}");

    // Back to a good version: a new revision, a new try.
    let mark = obs.messages().len();
    let (code, _, text) = console(&m, &["desired", "set", "--group", "lab", "ds-app=2.0", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    report(&obs, "ds-2", mark, "converged", serde_json::json!({"group/lab": 3}));
    assert_eq!(d2.dpkg_version("ds-app").as_deref(), Some("2.0"));

    // Drift: a command changes the package; the device says so and leaves it.
    let mark = obs.messages().len();
    let (code, _, text) = console(&m, &["rollback", "ds-2", "ds-app=1.0"]);
    assert_eq!(code, Some(0), "{text}");
    let r = report(&obs, "ds-2", mark, "blocked", serde_json::json!({"group/lab": 3}));
    assert_eq!(r["error"]["code"], "drifted", "{r}");
    assert_eq!(d2.dpkg_version("ds-app").as_deref(), Some("1.0"));

    // An install window in the device's local time (its agent runs at UTC+5:30 here): outside it
    // the device downloads and waits; it installs when the window opens.
    d2.ok(&["mkdir", "-p", "/etc/systemd/system/debfleet-agent.service.d"]);
    d2.ok(&[
        "sh",
        "-c",
        "printf '[Service]\\nEnvironment=TZ=XST-05:30\\n' > /etc/systemd/system/debfleet-agent.service.d/tz.conf",
    ]);
    d2.ok(&["systemctl", "daemon-reload"]);
    restart_agent(&obs, &d2, "ds-2");
    let local_s = debfleet_protocol::time::now_unix_ms() / 1000 + 5 * 3600 + 30 * 60;
    // Opens at the next minute (the one after when this one is nearly over), for half an hour.
    let opens = (local_s / 60 + if local_s % 60 < 40 { 1 } else { 2 }) % 1440;
    let hhmm = |m: i64| format!("{:02}:{:02}", m % 1440 / 60, m % 60);
    let window = format!("{}-{}", hhmm(opens), hhmm(opens + 30));
    let mark = obs.messages().len();
    let (code, _, text) = console(&m, &["desired", "set", "ds-2", "ds-app=2.0", "--window", &window, "--by", "ana"]);
    assert_eq!(code, Some(0), "{text}");
    let r = report(&obs, "ds-2", mark, "scheduled", serde_json::json!({"device": 1, "group/lab": 3}));
    assert_eq!(r["window"].as_str(), Some(window.as_str()), "{r}");
    let op = r["op"].as_str().expect("the operation that downloaded").to_owned();
    let waiting = obs.last(&format!("debfleet/device/ds-2/op/{op}")).unwrap().json();
    assert_eq!(
        (waiting["state"].as_str(), waiting["phase"].as_str()),
        (Some("running"), Some("waiting for the install window")),
        "{waiting}"
    );
    assert_eq!(waiting["by"], "ana", "{waiting}");
    assert_eq!(d2.dpkg_version("ds-app").as_deref(), Some("1.0"), "installed before its window");
    let log = d2.ok(&["journalctl", "-u", "debfleet-agent", "--no-pager", "-o", "cat"]);
    assert!(log.contains("ahead of the install window"), "downloaded ahead: {log}");
    let (_, v, _) = console(&m, &["desired", "show", "ds-2", "--json"]);
    assert_eq!(v["devices"]["ds-2"]["state"], "scheduled", "{v}");
    let (_, _, table) = console(&m, &["desired", "show", "ds-2"]);
    assert!(table.contains("scheduled") && table.contains(&window), "{table}");
    eprintln!("{table}");
    report(&obs, "ds-2", mark, "converged", serde_json::json!({"device": 1, "group/lab": 3}));
    assert_eq!(d2.dpkg_version("ds-app").as_deref(), Some("2.0"));
    let done = obs.last(&format!("debfleet/device/ds-2/op/{op}")).unwrap().json();
    assert_eq!((done["state"].as_str(), done["by"].as_str()), (Some("succeeded"), Some("ana")), "{done}");
    let (code, _, text) = console(&m, &["desired", "clear", "ds-2"]);
    assert_eq!(code, Some(0), "{text}");

    // Hostile records change nothing and say why; the last good one still applies.
    let big = format!(r#"{{"v":1,"revision":5,"packages":{{"ds-app":"2.0"}},"ts":"{}"}}"#, "x".repeat(40_000));
    for (bad, why) in [
        (b"{not json".to_vec(), "key must be a string"),
        (br#"{"v":1,"revision":9,"packages":{"ds-app":"1.0; reboot"},"ts":"t"}"#.to_vec(), "neither a Debian version"),
        (
            br#"{"v":1,"revision":9,"packages":{"../../etc/passwd":"1.0"},"ts":"t"}"#.to_vec(),
            "not a Debian package name",
        ),
        (br#"{"v":1,"revision":0,"packages":{},"ts":"t"}"#.to_vec(), "revision must be 1 or more"),
        (big.into_bytes(), "the limit is"),
    ] {
        let mark = obs.messages().len();
        obs.publish("debfleet/desired/device/ds-1", bad, true);
        let r = report_after(&obs, "ds-1", mark, |v| v["refused"]["device"].as_str().is_some_and(|w| w.contains(why)));
        assert_eq!(r["state"], "converged", "the last good record still applies: {r}");
        assert_eq!(r["revisions"], serde_json::json!({"device": 1, "group/lab": 3}), "{r}");
        let mark = obs.messages().len();
        let good = br#"{"v":1,"revision":1,"packages":{"ds-app":"2.0"},"ts":"t"}"#;
        obs.publish("debfleet/desired/device/ds-1", good.to_vec(), true);
        report_after(&obs, "ds-1", mark, |v| v["state"] == "converged" && v.get("refused").is_none());
    }
    assert_eq!(d1.dpkg_version("ds-app").as_deref(), Some("2.0"));
    assert_eq!(obs.last("debfleet/device/ds-1/status").unwrap().json()["state"], "online");

    // Clearing ds-1's record leaves the group's; `absent` removes the package everywhere.
    let mark = obs.messages().len();
    let (code, _, text) = console(&m, &["desired", "clear", "ds-1"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, _, text) = console(&m, &["desired", "set", "--group", "lab", "ds-app=absent"]);
    assert_eq!(code, Some(0), "{text}");
    for (name, dev) in [("ds-1", &d1), ("ds-2", &d2)] {
        report(&obs, name, mark, "converged", serde_json::json!({"group/lab": 4}));
        assert_eq!(dev.dpkg_version("ds-app"), None, "{name}");
    }
    // Deleting the last record deletes the reports, and removes nothing more.
    let (code, _, text) = console(&m, &["desired", "clear", "--group", "lab"]);
    assert_eq!(code, Some(0), "{text}");
    wait_for(Duration::from_secs(30), "the reports to be deleted", || {
        ["ds-1", "ds-2"]
            .iter()
            .all(|d| obs.last(&format!("debfleet/device/{d}/state/desired")).is_some_and(|m| m.payload.is_empty()))
            .then_some(())
    });
    // Bad input at the console is a usage error (exit 2) and publishes nothing.
    for args in [
        &["desired", "set", "--group", "lab", "ds-app"][..],
        &["desired", "set", "--group", "lab", "ds-app=1.0;reboot"],
        &["desired", "set", "ds-app=1.0"],
        &["desired", "set", "ds-1"],
        &["desired", "set", "Bad", "ds-app=1.0"],
        &["desired", "set", "--group", "lab", "ds-app=1.0", "--window", "25:00-01:00"],
        &["desired", "set", "--group", "lab", "--window", "02:00-02:00"],
        &["desired", "set", "--group", "lab"],
    ] {
        let (code, _, text) = console(&m, args);
        assert_eq!(code, Some(2), "{args:?}: {text}");
    }
}
