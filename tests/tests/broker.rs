//! Issue 16's broker half: `debfleet broker` writes a password file and an ACL file that a real
//! Mosquitto enforces — every row of the access matrix checked by what is delivered.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use debfleet_tests::*;

fn broker_cmd(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(bin("debfleet")).arg("broker").args(args).arg("--dir").arg(dir).output().unwrap();
    assert!(out.status.success(), "broker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn password(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.pw"))).unwrap().trim().to_owned()
}

/// The console as a broker user (the password through the environment).
fn console_as(m: &Mosquitto, user: &str, password: &str, args: &[&str]) -> Output {
    Command::new(bin("debfleet"))
        .args(["--broker", &m.url(), "--broker-user", user])
        .args(args)
        .env("DEBFLEET_BROKER_PASSWORD", password)
        .env("DEBFLEET_CONFIG", "/nonexistent")
        .env("XDG_CACHE_HOME", std::env::temp_dir().join(format!("df-broker-{}", rand_u32())))
        .output()
        .unwrap()
}

/// Publishes a last message on `topic` and waits until `who` has it: everything `from` sent
/// before has then been delivered too (one connection's messages keep their order).
fn settle(from: &Observer, who: &Observer, topic: &str) {
    let nonce = format!("{{\"n\":{}}}", rand_u32());
    from.publish(topic, nonce.clone(), false);
    wait_for(Duration::from_secs(10), "the settling message", || {
        who.messages().iter().any(|m| m.topic == topic && m.payload == nonce.as_bytes()).then_some(())
    });
}

fn seen(o: &Observer, topic: &str) -> bool {
    o.messages().iter().any(|m| m.topic == topic)
}

#[test]
fn generated_passwords_and_acls_hold_on_a_real_mosquitto() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("broker");
    broker_cmd(&dir, &["init"]);
    for (name, args) in [
        ("d1", vec!["add-device", "d1", "--groups", "lab"]),
        ("d2", vec!["add-device", "d2"]),
        ("ana", vec!["add-user", "ana", "--role", "viewer"]),
        ("ops", vec!["add-user", "ops", "--role", "operator"]),
        ("boss", vec!["add-user", "boss", "--role", "admin"]),
    ] {
        let out = dir.join(format!("{name}.pw"));
        let mut args = args.clone();
        args.extend(["--password-out", out.to_str().unwrap()]);
        broker_cmd(&dir, &args);
    }
    let enrolled = broker_cmd(&dir, &["add-device", "d3", "--groups", "lab"]);
    let text = String::from_utf8_lossy(&enrolled.stdout);
    assert!(text.contains("username = \"d3\"") && text.contains("password_file = "), "{text}");
    let lines = String::from_utf8(broker_cmd(&dir, &["config"]).stdout).unwrap();
    assert!(lines.contains("allow_anonymous false") && lines.contains("acl_file "), "{lines}");
    let m = Mosquitto::start_secured(&lines);
    let pw = |n: &str| password(&dir, n);

    let boss = Observer::connect_as(m.port, "boss", &pw("boss"), &["debfleet/#"]);
    let d1 = Observer::connect_as(
        m.port,
        "d1",
        &pw("d1"),
        &[
            "debfleet/device/d1/cmd/+",
            "debfleet/fleet/cmd/+",
            "debfleet/group/lab/cmd/+",
            "debfleet/desired/device/d1",
            // Not its own: the broker delivers none of these to it.
            "debfleet/device/d2/#",
            "debfleet/group/other/cmd/+",
            "debfleet/desired/device/d2",
        ],
    );

    // A device writes its own facts, and nothing else: not another device's, not a command
    // (its own either), not a retained command, not desired state.
    d1.publish("debfleet/device/d1/meta", r#"{"v":1}"#, true);
    d1.publish("debfleet/device/d2/meta", r#"{"spoof":true}"#, true);
    d1.publish("debfleet/device/d2/op/x", r#"{"spoof":true}"#, true);
    d1.publish("debfleet/device/d1/cmd/install", r#"{"spoof":true}"#, false);
    d1.publish("debfleet/group/lab/cmd/install", r#"{"spoof":true}"#, true);
    d1.publish("debfleet/fleet/cmd/install", r#"{"spoof":true}"#, false);
    d1.publish("debfleet/desired/device/d1", r#"{"spoof":true}"#, true);
    settle(&d1, &boss, "debfleet/device/d1/logs");
    assert!(seen(&boss, "debfleet/device/d1/meta"));
    for t in [
        "debfleet/device/d2/meta",
        "debfleet/device/d2/op/x",
        "debfleet/device/d1/cmd/install",
        "debfleet/group/lab/cmd/install",
        "debfleet/fleet/cmd/install",
        "debfleet/desired/device/d1",
    ] {
        assert!(!seen(&boss, t), "a device's publish on {t} went through");
        assert!(!seen(&d1, t), "{t}");
    }
    // Nothing was retained on a command topic either.
    let late = Observer::connect_as(m.port, "boss", &pw("boss"), &["debfleet/group/+/cmd/#", "debfleet/device/d2/#"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(late.messages().is_empty(), "{:?}", late.messages().iter().map(|m| &m.topic).collect::<Vec<_>>());

    // An operator commands; a device reads only its own, its groups' and the fleet's commands.
    let ops = Observer::connect_as(m.port, "ops", &pw("ops"), &[]);
    for t in [
        "debfleet/device/d2/cmd/ping",
        "debfleet/group/other/cmd/ping",
        "debfleet/device/d1/cmd/ping",
        "debfleet/group/lab/cmd/ping",
    ] {
        ops.publish(t, r#"{"id":"c"}"#, false);
    }
    // An operator cannot set desired state (an admin can); a device cannot read another's.
    ops.publish("debfleet/desired/device/d1", r#"{"by":"ops"}"#, true);
    boss.publish("debfleet/desired/device/d2", r#"{"by":"boss"}"#, true);
    settle(&ops, &d1, "debfleet/fleet/cmd/ping");
    for t in ["debfleet/device/d1/cmd/ping", "debfleet/group/lab/cmd/ping"] {
        assert!(seen(&d1, t), "{t}");
    }
    for t in ["debfleet/device/d2/cmd/ping", "debfleet/group/other/cmd/ping", "debfleet/desired/device/d2"] {
        assert!(!seen(&d1, t), "device d1 read {t}");
    }
    settle(&boss, &boss, "debfleet/rollout/r1/control");
    assert!(!seen(&boss, "debfleet/desired/device/d1"), "an operator set desired state");
    assert!(seen(&boss, "debfleet/desired/device/d2"));

    // A viewer reads everything and commands nothing.
    let ana = Observer::connect_as(m.port, "ana", &pw("ana"), &["debfleet/#"]);
    ana.wait("debfleet/device/d1/meta", Duration::from_secs(5), |_| true);
    d1.clear();
    ana.publish("debfleet/device/d1/cmd/ping", r#"{"id":"viewer"}"#, false);
    ana.publish("debfleet/fleet/cmd/ping", r#"{"id":"viewer"}"#, false);
    settle(&ops, &d1, "debfleet/group/lab/cmd/ping");
    assert!(!d1.messages().iter().any(|m| m.payload.windows(6).any(|w| w == b"viewer")), "a viewer commanded");

    // The real agent, enrolled, works under its ACL: an operator pings it, a viewer lists it
    // but cannot command it (exit 4, said so), a wrong password and no password are refused.
    let agent = Agent::start(AgentSpec {
        id: "d1",
        port: m.port,
        groups: &["lab"],
        extra: &format!("username = \"d1\"\npassword_file = {:?}\n", dir.join("d1.pw")),
    });
    let out = console_as(&m, "ops", &pw("ops"), &["ping", "d1", "--timeout", "20"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.log());
    let out = console_as(&m, "ana", &pw("ana"), &["devices", "--json"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"d1\""), "{out:?}");
    let out = console_as(&m, "ana", &pw("ana"), &["ping", "d1", "--timeout", "20"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("refused a message this console sent (not authorized)"), "{err}");
    let out = console_as(&m, "ops", "not-the-password", &["devices"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("refused the connection") && err.contains("password"), "{err}");
    let out = Command::new(bin("debfleet"))
        .args(["--broker", &m.url(), "devices"])
        .env("DEBFLEET_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "anonymous: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!agent.log().contains("refused a message"), "the agent's own publishes all pass: {}", agent.log());

    // Removing a device and reloading the broker locks it out.
    broker_cmd(&dir, &["remove", "d2"]);
    // SAFETY: SIGHUP to the test's own Mosquitto: it reads its password and ACL files again.
    unsafe { libc::kill(m.pid(), libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    let mut opts = rumqttc::MqttOptions::new("d2-again", "127.0.0.1", m.port);
    opts.set_credentials("d2", pw("d2"));
    let (_c, mut conn) = rumqttc::Client::new(opts, 10);
    let first = conn.iter().next().unwrap();
    assert!(first.is_err(), "a removed device connected: {first:?}");
}

#[test]
fn serve_listens_beyond_loopback_only_with_passwords_and_then_checks_them() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("broker");
    let port = free_port();
    let out = Command::new(bin("debfleet"))
        .args(["serve", "--no-web", "--listen", &format!("0.0.0.0:{port}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a loopback address: give --broker-dir"), "{err}");

    broker_cmd(&dir, &["init"]);
    broker_cmd(&dir, &["add-device", "e1", "--password-out", dir.join("e1.pw").to_str().unwrap()]);
    broker_cmd(
        &dir,
        &["add-user", "ops", "--role", "operator", "--password-out", dir.join("ops.pw").to_str().unwrap()],
    );
    let mut serve = embedded_broker_with(port, &["--no-web", "--broker-dir", dir.to_str().unwrap()]);
    let agent = Agent::start(AgentSpec {
        id: "e1",
        port,
        groups: &[],
        extra: &format!("username = \"e1\"\npassword_file = {:?}\n", dir.join("e1.pw")),
    });
    let url = format!("mqtt://127.0.0.1:{port}");
    let run = |user: Option<(&str, &str)>, args: &[&str]| {
        let mut cmd = Command::new(bin("debfleet"));
        cmd.args(["--broker", &url]).env("DEBFLEET_CONFIG", "/nonexistent");
        if let Some((u, p)) = user {
            cmd.args(["--broker-user", u]).env("DEBFLEET_BROKER_PASSWORD", p);
        }
        cmd.args(args).output().unwrap()
    };
    let out = run(Some(("ops", &password(&dir, "ops"))), &["ping", "e1", "--timeout", "20"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.log());
    for user in [Some(("ops", "wrong-password")), None] {
        let out = run(user, &["devices"]);
        assert_ne!(out.status.code(), Some(0), "{user:?} got in");
    }
    let _ = serve.kill();
    let _ = serve.wait();
}

/// The console with a signing key (or none) against an open broker.
fn console_signed(m: &Mosquitto, key: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("debfleet"));
    cmd.args(["--broker", &m.url()]).env("DEBFLEET_CONFIG", "/nonexistent").env_remove("DEBFLEET_SIGN_KEY");
    if let Some(k) = key {
        cmd.arg("--sign-key").arg(k);
    }
    cmd.args(args).output().unwrap()
}

fn codes(out: &Output) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("not JSON: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    v.as_array().unwrap().iter().map(|o| o["code"].as_str().unwrap_or("ok").to_owned()).collect()
}

#[test]
fn a_device_that_requires_signatures_runs_only_what_a_trusted_operator_signed_for_it() {
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    let trusted = work.path().join("operators.d");
    std::fs::create_dir(&trusted).unwrap();
    for name in ["ana-2026", "ana-2027", "eve"] {
        let out = Command::new(bin("debfleet")).args(["key", "generate", name, "--dir"]).arg(&keys).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::copy(keys.join("ana-2026.pub"), trusted.join("ana-2026.pub")).unwrap();
    let (ana, ana2, eve) = (keys.join("ana-2026.key"), keys.join("ana-2027.key"), keys.join("eve.key"));
    let m = Mosquitto::start();
    let agent = Agent::start(AgentSpec {
        id: "s1",
        port: m.port,
        groups: &["lab"],
        extra: &format!("require_signed_commands = true\noperators_dir = {trusted:?}\n"),
    });
    let watch = Observer::connect(m.port, &["debfleet/device/s1/#"]);
    watch.wait("debfleet/device/s1/status", Duration::from_secs(20), |v| v["state"] == "online");
    let ping = |key: Option<&Path>, target: &[&str]| {
        let mut args = vec!["ping", "--json", "--timeout", "15"];
        args.extend(target);
        codes(&console_signed(&m, key, &args))
    };
    assert_eq!(ping(None, &["s1"]), ["unauthorized"], "unsigned");
    assert_eq!(ping(Some(&eve), &["s1"]), ["unauthorized"], "a key the device does not trust");
    assert_eq!(ping(Some(&ana), &["s1"]), ["ok"]);
    assert_eq!(ping(Some(&ana), &["--group", "lab"]), ["ok"], "signed for the group's topic");
    assert_eq!(ping(Some(&ana), &["--all"]), ["ok"]);
    let log = agent.log();
    assert!(log.contains("no sig") && log.contains("\"eve\" is not trusted here"), "{log}");

    // A signed command taken off the wire: replayed on its own topic it is not run again (the
    // device answers with the recorded outcome); on another verb, another target, or altered, it
    // is refused.
    let spy = Observer::connect(m.port, &["debfleet/device/+/cmd/#"]);
    assert_eq!(ping(Some(&ana), &["s1"]), ["ok"]);
    let taken = wait_for(Duration::from_secs(5), "the signed ping", || spy.last("debfleet/device/s1/cmd/ping"));
    let id = taken.json()["id"].as_str().unwrap().to_owned();
    assert!(taken.json()["sig"]["key"] == "ana-2026");
    let refused = |topic: &str, payload: &[u8], why: &str| {
        watch.clear();
        spy.publish(topic, payload.to_vec(), false);
        let rec =
            watch.wait(&format!("debfleet/device/s1/op/{id}"), Duration::from_secs(10), |v| v["state"] == "failed");
        assert_eq!(rec["error"]["code"], "unauthorized", "{topic}: {rec}");
        assert!(rec["error"]["message"].as_str().unwrap().contains(why), "{topic}: {rec}");
    };
    let ok = console_signed(&m, Some(&ana), &["ops", "s1", "--clear"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    watch.clear();
    spy.publish("debfleet/device/s1/cmd/ping", taken.payload.clone(), false);
    let rec = watch.wait(&format!("debfleet/device/s1/op/{id}"), Duration::from_secs(10), |v| v["repeats"] == 1);
    assert_eq!(rec["state"], "succeeded", "{rec}");
    refused("debfleet/device/s1/cmd/refresh", &taken.payload, "does not verify for device/s1");
    refused("debfleet/fleet/cmd/ping", &taken.payload, "does not verify for fleet");
    let mut altered: serde_json::Value = taken.json();
    altered["by"] = "mallory".into();
    refused("debfleet/device/s1/cmd/ping", &serde_json::to_vec(&altered).unwrap(), "does not verify");

    // Rotation: the new key is trusted beside the old; then the old is removed (revoked).
    assert_eq!(ping(Some(&ana2), &["s1"]), ["unauthorized"]);
    std::fs::copy(keys.join("ana-2027.pub"), trusted.join("ana-2027.pub")).unwrap();
    assert_eq!(ping(Some(&ana2), &["s1"]), ["ok"]);
    std::fs::remove_file(trusted.join("ana-2026.pub")).unwrap();
    assert_eq!(ping(Some(&ana), &["s1"]), ["unauthorized"], "a revoked key");
    assert_eq!(ping(Some(&ana2), &["s1"]), ["ok"]);

    // Desired state carries no signature: such a device refuses it and says why.
    let out = console_signed(&m, Some(&ana2), &["desired", "set", "s1", "df-hello=1.0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report =
        watch.wait("debfleet/device/s1/state/desired", Duration::from_secs(15), |v| v["refused"]["device"].is_string());
    assert!(report["refused"]["device"].as_str().unwrap().starts_with("unauthorized"), "{report}");
    assert!(report["packages"].as_object().unwrap().is_empty(), "{report}");
}

#[test]
fn operator_keys_ship_as_a_package_and_an_upgrade_without_a_key_revokes_it() {
    use debfleet_tests::repo::{AptSandbox, RepoServer};
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    for name in ["ana-2026", "ana-2027"] {
        let out = Command::new(bin("debfleet")).args(["key", "generate", name, "--dir"]).arg(&keys).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The example manifest, as the README has ops teams use it, with our two keys.
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/operator-keys/manifest.toml"))
            .unwrap();
    let block = |k: &str| {
        format!("\n[[files]]\nsource = \"keys/{k}.pub\"\ndest = \"/etc/debfleet/operators.d/{k}.pub\"\nmode = \"0644\"\nconffile = false\n")
    };
    let head = example.split("\n[[files]]").next().unwrap().to_owned();
    let server = RepoServer::start(&[]);
    for (version, with) in [("1", vec!["ana-2026", "ana-2027"]), ("2", vec!["ana-2027"])] {
        let manifest = keys.parent().unwrap().join(format!("manifest-{version}.toml"));
        let text = head.replace("version = \"1\"", &format!("version = \"{version}\""))
            + &with.iter().map(|k| block(k)).collect::<String>();
        std::fs::write(&manifest, text).unwrap();
        let out =
            Command::new(bin("debfleet")).arg("package").arg(&manifest).arg("--out").arg(work.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let deb = work.path().join(format!("acme-operator-keys_{version}_all.deb"));
        let out = server.publish(&deb, "stable");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let apt = AptSandbox::new(
        &server.url(),
        "stable",
        &std::fs::read(server.root.join("public/debfleet-archive-keyring.gpg")).unwrap(),
    );
    assert!(apt.update().status.success());
    let dir = apt.root().join("etc/debfleet/operators.d");
    let out = apt.install("acme-operator-keys=1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dir.join("ana-2026.pub")).unwrap(), std::fs::read(keys.join("ana-2026.pub")).unwrap());
    assert!(dir.join("ana-2027.pub").exists());
    let out = apt.install("acme-operator-keys=2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.join("ana-2026.pub").exists(), "the upgrade left a revoked key behind");
    assert!(dir.join("ana-2027.pub").exists());
}
