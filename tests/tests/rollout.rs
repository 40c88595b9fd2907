//! Staged rollouts on six real devices (issue 14): a good version in three waves; a version whose
//! unit fails halting after the first wave and rolling it back; a controller killed mid-rollout
//! and another finishing it (never two at once); a device away during its wave converging when it
//! returns; an abort leaving the later waves untouched; hostile rollout messages changing nothing.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use debfleet_tests::lab::Device;
use debfleet_tests::repo::{service_deb, RepoServer};
use debfleet_tests::*;
use serde_json::Value;

const DEVICES: [&str; 6] = ["ro-1", "ro-2", "ro-3", "ro-4", "ro-5", "ro-6"];

fn console(m: &Mosquitto, args: &[&str]) -> (Option<i32>, Value, String) {
    console_result(&m.url(), args)
}

/// `debfleet rollout create ARGS` (words), which must succeed; its JSON output (with --json).
fn create(m: &Mosquitto, args: &str) -> Value {
    let args: Vec<&str> = ["rollout", "create"].into_iter().chain(args.split_whitespace()).collect();
    let (code, v, text) = console(m, &args);
    assert_eq!(code, Some(0), "{text}");
    v
}

fn controller(m: &Mosquitto) -> Child {
    Command::new(bin("debfleet"))
        .args(["rollout", "run"])
        .env("DEBFLEET_BROKER", m.url())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits for the rollout's state to satisfy `pred`; on a timeout, says what it was.
fn state(obs: &Observer, id: &str, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let topic = format!("debfleet/rollout/{id}");
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let last = obs.last(&topic).filter(|m| !m.payload.is_empty()).map(|m| m.json());
        if let Some(s) = last.as_ref().filter(|s| pred(s)) {
            return s.clone();
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out waiting for rollout {id}: {what}; its state: {last:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stages(s: &Value) -> Vec<(String, String)> {
    s["devices"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(d, e)| (d.clone(), e["state"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn rollouts_move_in_waves_halt_on_trouble_and_survive_their_controller() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/status", "debfleet/rollout/#", "debfleet/desired/#"]);
    let repo = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    for (v, broken) in [("1.0", false), ("2.0", false), ("3.0", true), ("4.0", false), ("5.0", false)] {
        assert!(repo.publish(&service_deb(work.path(), "ro-app", v, broken), "stable").status.success());
    }
    let config = format!(
        "broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\ngroups = [\"lab\"]\n\n[apt]\nwatch_s = 3\nsettle_s = 2\n",
        m.url()
    );
    let devices: Vec<Device> = DEVICES
        .iter()
        .map(|name| {
            let dev = Device::boot(name);
            dev.install_agent(&config, &repo);
            dev
        })
        .collect();
    for name in DEVICES {
        obs.wait(&format!("debfleet/device/{name}/status"), Duration::from_secs(30), |v| v["state"] == "online");
    }
    // Everyone starts on 1.0.
    let (code, _, text) = console(&m, &["desired", "set", "--group", "lab", "ro-app=1.0"]);
    assert_eq!(code, Some(0), "{text}");
    wait_for(Duration::from_secs(180), "every device on 1.0", || {
        devices.iter().all(|d| d.dpkg_version("ro-app").as_deref() == Some("1.0")).then_some(())
    });
    let mut ctl = controller(&m);

    // A good version in three waves: 1, then half, then all; each after its devices proved healthy.
    let v = create(
        &m,
        "--group lab --id good ro-app=2.0 --waves 1,50%,100% --watch 3s --deadline 2m --success 100% --by ana --json",
    );
    assert_eq!(v["waves"], serde_json::json!([1, 3, 6]), "{v}");
    let s = state(&obs, "good", 300, "succeeded", |s| s["phase"] == "succeeded");
    assert!(stages(&s).iter().all(|(_, st)| st == "healthy"), "{s:#}");
    let waves: Vec<u64> = DEVICES.iter().map(|d| s["devices"][d]["wave"].as_u64().unwrap()).collect();
    assert_eq!(waves, [0, 1, 1, 2, 2, 2], "{s:#}");
    for d in &devices {
        assert_eq!(d.dpkg_version("ro-app").as_deref(), Some("2.0"));
    }
    // Each wave started only once the one before was healthy: no published state has a device of
    // a wave while one of the wave before is not yet healthy.
    let published: Vec<Value> =
        obs.messages().iter().filter(|m| m.topic == "debfleet/rollout/good").map(|m| m.json()).collect();
    assert!(published.len() >= 3, "{published:#?}");
    for s in &published {
        for (later, earlier) in [("ro-2", &["ro-1"][..]), ("ro-4", &["ro-1", "ro-2", "ro-3"])] {
            if s["devices"].get(later).is_some() {
                assert!(earlier.iter().all(|d| s["devices"][d]["state"] == "healthy"), "{later} asked early: {s:#}");
            }
        }
    }
    let group = obs.last("debfleet/desired/group/lab").unwrap().json();
    assert_eq!(group["packages"]["ro-app"], "2.0", "the group's record names the new version: {group}");
    let (code, v, _) = console(&m, &["rollout", "list", "--json"]);
    assert_eq!((code, v[0]["phase"].as_str()), (Some(0), Some("succeeded")), "{v}");

    // A version whose unit fails: the first wave fails, the rollout halts and rolls it back; the
    // other five are never asked.
    create(&m, "--group lab --id bad ro-app=3.0 --waves 1,100% --watch 3s --auto-rollback");
    let s = state(&obs, "bad", 300, "rolled back", |s| s["phase"] == "rolled_back");
    assert_eq!(stages(&s), [("ro-1".to_owned(), "reverted".to_owned())], "{s:#}");
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d.dpkg_version("ro-app").as_deref(), Some("2.0"), "{}", DEVICES[i]);
    }
    assert!(!obs.messages().iter().any(|m| m.topic.starts_with("debfleet/desired/device/ro-")
        && m.topic != "debfleet/desired/device/ro-1"
        && m.json()["packages"]["ro-app"] == "3.0"));
    let (_, _, table) = console(&m, &["rollout", "status", "bad"]);
    assert!(table.contains("rolled_back") && table.contains("reverted"), "{table}");

    // The controller dies mid-rollout, with a device away during its wave. A second controller
    // cannot take the live lease; once the lease lapses it takes over and finishes from the state
    // the first one left.
    devices[5].ok(&["systemctl", "stop", "debfleet-agent"]);
    obs.wait("debfleet/device/ro-6/status", Duration::from_secs(30), |v| v["state"] == "offline");
    create(&m, "--group lab --id relay ro-app=4.0 --waves 2,100% --watch 3s --deadline 40s --success 80%");
    let first = state(&obs, "relay", 120, "the first wave healthy", |s| {
        s["devices"]["ro-1"]["state"] == "healthy" && s["devices"]["ro-2"]["state"] == "healthy"
    });
    let holder = obs.last("debfleet/rollout/relay/lease").unwrap().json()["holder"].as_str().unwrap().to_owned();
    let mut second = controller(&m);
    std::thread::sleep(Duration::from_secs(5));
    let lease = obs.last("debfleet/rollout/relay/lease").unwrap().json();
    assert_eq!(lease["holder"], holder.as_str(), "a second controller took a live lease");
    ctl.kill().unwrap();
    ctl.wait().unwrap();
    let s = state(&obs, "relay", 300, "succeeded under the second controller", |s| s["phase"] == "succeeded");
    let now_holder = obs.last("debfleet/rollout/relay/lease").map(|m| m.payload.is_empty());
    assert_eq!(now_holder, Some(true), "the lease is released when the rollout ends");
    assert_eq!(s["devices"]["ro-1"]["revision"], first["devices"]["ro-1"]["revision"], "ro-1 was not asked again");
    assert_eq!(s["devices"]["ro-6"]["state"], "offline", "{s:#}");
    // The device away comes back and converges: its record waited for it.
    devices[5].ok(&["systemctl", "start", "debfleet-agent"]);
    wait_for(Duration::from_secs(120), "ro-6 on 4.0", || {
        (devices[5].dpkg_version("ro-app").as_deref() == Some("4.0")).then_some(())
    });
    for d in &devices[..5] {
        assert_eq!(d.dpkg_version("ro-app").as_deref(), Some("4.0"));
    }

    // Paused after its first wave, then aborted: the later waves are never asked.
    create(&m, "--group lab --id stopped ro-app=5.0 --waves 1,100% --watch 3s --pause-after-wave");
    state(&obs, "stopped", 120, "paused after wave 1", |s| s["phase"] == "paused");
    let (code, v, text) = console(&m, &["rollout", "abort", "stopped", "--by", "bo", "--json"]);
    assert_eq!((code, v["phase"].as_str()), (Some(0), Some("aborted")), "{text}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(devices[0].dpkg_version("ro-app").as_deref(), Some("5.0"), "what converged stays");
    for d in &devices[1..] {
        assert_eq!(d.dpkg_version("ro-app").as_deref(), Some("4.0"));
    }

    // Hostile rollout messages: refused, the controller keeps running, nothing changes.
    for (topic, bad) in [
        ("debfleet/rollout/evil/spec", b"{not json".to_vec()),
        ("debfleet/rollout/evil/spec", br#"{"v":1,"id":"other","group":"lab","packages":{"ro-app":"9.9"},"waves":["100%"],"success_pct":95,"max_failures":1,"watch_s":1,"deadline_s":1,"by":"x","ts":"t"}"#.to_vec()),
        ("debfleet/rollout/evil2/spec", br#"{"v":1,"id":"evil2","group":"lab","packages":{"ro-app":"9.9; reboot"},"waves":["100%"],"success_pct":95,"max_failures":1,"watch_s":1,"deadline_s":1,"by":"x","ts":"t"}"#.to_vec()),
        ("debfleet/rollout/good/control", vec![b'x'; 20_000]),
        ("debfleet/rollout/good/state", b"[]".to_vec()),
    ] {
        obs.publish(topic, bad, true);
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(second.try_wait().unwrap().is_none(), "the controller is still running");
    assert!(!obs.messages().iter().any(|m| m.topic.starts_with("debfleet/desired/")
        && m.json()["packages"]["ro-app"].as_str().is_some_and(|v| v.starts_with("9.9"))));
    let (code, v, text) = console(&m, &["rollout", "list", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v.as_array().unwrap().len(), 4, "{v}");
    // Bad input at the console: a usage error, nothing published.
    for args in [
        &["rollout", "create", "--group", "lab", "ro-app=latest"][..],
        &["rollout", "create", "--group", "lab", "ro-app=6.0", "--waves", "1,50%"],
        &["rollout", "create", "--group", "lab", "ro-app=6.0", "--success", "0%"],
        &["rollout", "create", "--group", "lab", "--id", "good", "ro-app=6.0"],
        &["rollout", "pause", "nope"],
    ] {
        let (code, _, text) = console(&m, args);
        assert_eq!(code, Some(2), "{args:?}: {text}");
    }
    second.kill().unwrap();
    second.wait().unwrap();
}
