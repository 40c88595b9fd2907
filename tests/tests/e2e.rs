//! End-to-end tests of the foundation (issue 2): real Mosquitto, real agent and console
//! processes, everything over 127.0.0.1.

use std::process::Command;
use std::time::Duration;

use debfleet_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(15);

fn agent(id: &str, port: u16, groups: &[&str]) -> Agent {
    Agent::start(AgentSpec { id, port, groups, extra: "" })
}

fn online(obs: &Observer, id: &str) -> Value {
    obs.wait(&format!("debfleet/device/{id}/status"), T, |v| v["state"] == "online")
}

fn op_final(obs: &Observer, id: &str, op: &str) -> Value {
    obs.wait(&format!("debfleet/device/{id}/op/{op}"), T, |v| v["state"] == "succeeded" || v["state"] == "failed")
}

fn op_file(agent: &Agent, op: &str) -> Option<Value> {
    let bytes = std::fs::read(agent.state_dir().join("ops").join(format!("{op}.json"))).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok().map(|e| e["record"].clone())
}

#[test]
fn retained_facts_are_on_the_broker_after_connect() {
    let m = Mosquitto::start();
    let _a = agent("dev-1", m.port, &["lab"]);
    let live = Observer::connect(m.port, &["debfleet/#"]);
    let status = online(&live, "dev-1");
    // A console that connects later learns everything from retained messages alone.
    let late = Observer::connect(m.port, &["debfleet/device/dev-1/#"]);
    for topic in ["meta", "status", "cfg", "state/packages"] {
        let t = format!("debfleet/device/dev-1/{topic}");
        let msg = wait_for(T, &t, || late.last(&t));
        assert!(msg.retain, "{t} must be retained");
        assert_eq!(msg.json()["v"], 1, "{t}");
    }
    let meta = late.last("debfleet/device/dev-1/meta").unwrap().json();
    assert_eq!(meta["device_id"], "dev-1");
    assert_eq!(meta["groups"], serde_json::json!(["lab"]));
    assert!(meta["commands"].as_array().unwrap().iter().any(|c| c == "ping"));
    assert_eq!(meta["boot_id"], status["boot_id"]);
    assert!(!meta["boot_id"].as_str().unwrap().is_empty());
    assert!(debfleet_protocol_time_ok(status["since"].as_str().unwrap()));
}

fn debfleet_protocol_time_ok(ts: &str) -> bool {
    ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T'
}

#[test]
fn sigkill_leaves_lost_and_sigterm_leaves_offline() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/status"]);
    let mut a = agent("dev-k", m.port, &[]);
    let status = online(&obs, "dev-k");
    a.kill9();
    let lost = obs.wait("debfleet/device/dev-k/status", T, |v| v["state"] == "lost");
    assert_eq!(lost["since"], status["since"], "lost carries the start of the connection that vanished");
    assert_eq!(lost["boot_id"], status["boot_id"]);

    let mut b = agent("dev-t", m.port, &[]);
    online(&obs, "dev-t");
    b.signal(libc_sigterm());
    assert_eq!(b.wait_exit(Duration::from_secs(10)), Some(0));
    obs.wait("debfleet/device/dev-t/status", T, |v| v["state"] == "offline");
    assert!(b.log().contains("stopping"));
}

fn libc_sigterm() -> i32 {
    15
}

#[test]
fn pending_result_is_delivered_after_a_partition_and_broker_restart() {
    let mut m = Mosquitto::start();
    let proxy = Proxy::start(m.port);
    let mut a = agent("dev-p", proxy.port, &[]);
    let obs = Observer::connect(m.port, &["debfleet/device/dev-p/#"]);
    online(&obs, "dev-p");
    // The agent's traffic to the broker now vanishes while it still thinks it is connected.
    proxy.stall_upstream(true);
    obs.publish("debfleet/device/dev-p/cmd/ping", r#"{"id":"pending-1"}"#, false);
    wait_for(T, "the agent to finish the operation", || op_file(&a, "pending-1").filter(|r| r["state"] == "succeeded"));
    assert!(obs.last("debfleet/device/dev-p/op/pending-1").is_none(), "the result must not have got through yet");
    // Broker restart (retained state not persisted) and the partition heals.
    drop(obs);
    m.restart();
    proxy.cut_all();
    proxy.stall_upstream(false);
    let obs = Observer::connect(m.port, &["debfleet/device/dev-p/#"]);
    let rec = op_final(&obs, "dev-p", "pending-1");
    assert_eq!(rec["state"], "succeeded");
    online(&obs, "dev-p");
    assert!(a.is_running());
}

#[test]
fn agent_waits_for_a_broker_that_is_not_there_yet() {
    let port = free_port();
    let mut a = agent("dev-late", port, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(a.is_running(), "the agent keeps retrying");
    let m = Mosquitto::start_on(port);
    let obs = Observer::connect(m.port, &["debfleet/device/dev-late/status"]);
    online(&obs, "dev-late");
}

#[test]
fn repeated_id_returns_recorded_outcome_across_restart() {
    let m = Mosquitto::start();
    let mut a = agent("dev-d", m.port, &[]);
    let obs = Observer::connect(m.port, &["debfleet/device/dev-d/op/+", "debfleet/device/dev-d/status"]);
    online(&obs, "dev-d");
    obs.publish("debfleet/device/dev-d/cmd/ping", r#"{"id":"dup-1"}"#, false);
    let first = op_final(&obs, "dev-d", "dup-1");
    a.signal(libc_sigterm());
    assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(0));
    a.spawn();
    obs.clear();
    online(&obs, "dev-d");
    obs.clear();
    obs.publish("debfleet/device/dev-d/cmd/ping", r#"{"id":"dup-1"}"#, false);
    let again = obs.wait("debfleet/device/dev-d/op/dup-1", T, |v| v["repeats"] == 1);
    assert_eq!(again["updated_at"], first["updated_at"], "not executed a second time");
    assert_eq!(again["result"], first["result"]);
    let states: Vec<Value> =
        obs.messages().iter().filter(|m| m.topic.ends_with("/dup-1")).map(|m| m.json()["state"].clone()).collect();
    assert!(!states.iter().any(|s| s == "running"), "no second run: {states:?}");
}

#[test]
fn bad_input_gets_clear_errors_and_the_agent_keeps_running() {
    let m = Mosquitto::start();
    let mut a = agent("dev-b", m.port, &[]);
    let obs = Observer::connect(m.port, &["debfleet/device/dev-b/#"]);
    online(&obs, "dev-b");
    let cmd =
        |verb: &str, payload: &[u8]| obs.publish(&format!("debfleet/device/dev-b/cmd/{verb}"), payload.to_vec(), false);
    let rejected = |code: &str| obs.wait("debfleet/device/dev-b/rejected", T, |v| v["code"] == code);

    cmd("ping", b"{not json");
    rejected("malformed_json");
    cmd("ping", b"\xff\xfe\x00garbage");
    cmd("ping", b"[1,2,3]");
    cmd("ping", br#"{"no":"id"}"#);
    rejected("missing_id");
    cmd("ping", br#"{"id":"../../etc/passwd"}"#);
    rejected("invalid_id");
    cmd("ping", br#"{"id":123}"#);
    let big = format!(r#"{{"id":"big-1","pad":"{}"}}"#, "x".repeat(100_000));
    cmd("ping", big.as_bytes());
    let r = rejected("payload_too_large");
    assert!(r["message"].as_str().unwrap().contains("limit"));

    cmd("selfdestruct", br#"{"id":"u-1"}"#);
    assert_eq!(op_final(&obs, "dev-b", "u-1")["error"]["code"], "unknown_verb");
    cmd("cfg", br#"{"id":"c-1","set":{"telemetry":{"cpu":{"interval_s":0}}}}"#);
    let c = op_final(&obs, "dev-b", "c-1");
    assert_eq!(c["error"]["code"], "invalid_value");
    assert!(c["error"]["message"].as_str().unwrap().contains("telemetry.cpu.interval_s"));
    cmd("cfg", br#"{"id":"c-2","set":"everything"}"#);
    assert_eq!(op_final(&obs, "dev-b", "c-2")["error"]["code"], "invalid_value");
    cmd("restart", br#"{"id":"r-1"}"#);
    let r = op_final(&obs, "dev-b", "r-1");
    assert_eq!(r["error"]["code"], "not_supported", "not under systemd here: {r}");

    // Still alive, still answering, configuration untouched.
    cmd("ping", br#"{"id":"alive-1"}"#);
    assert_eq!(op_final(&obs, "dev-b", "alive-1")["state"], "succeeded");
    assert!(a.is_running());
    let cfg = obs.last("debfleet/device/dev-b/cfg").unwrap().json();
    assert_eq!(cfg["telemetry"]["cpu"]["interval_s"], 10);
}

#[test]
fn ping_through_device_group_and_fleet_topics() {
    let m = Mosquitto::start();
    let _a = agent("lab-1", m.port, &["lab"]);
    let _b = agent("lab-2", m.port, &["lab", "edge"]);
    let _c = agent("other-1", m.port, &[]);
    let obs = Observer::connect(m.port, &["debfleet/device/+/status"]);
    for d in ["lab-1", "lab-2", "other-1"] {
        online(&obs, d);
    }
    let url = m.url();
    let out = console(&url, &["ping", "--group", "lab", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let ids: Vec<&str> = v.as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["lab-1", "lab-2"]);
    for o in v.as_array().unwrap() {
        assert_eq!(o["ok"], true);
        assert!(o["rtt_ms"].as_u64().is_some());
    }
    let v = stdout_json(&console(&url, &["ping", "--all", "--json"]));
    assert_eq!(v.as_array().unwrap().len(), 3);
    let out = console(&url, &["ping", "other-1", "lab-2"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("DEVICE") && text.contains("other-1") && text.contains(" ms"), "{text}");

    // A device that is gone makes the exit status non-zero.
    drop(_c);
    obs.wait("debfleet/device/other-1/status", T, |v| v["state"] == "lost");
    let out = console(&url, &["ping", "--all", "--json", "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let v = stdout_json(&out);
    let other = v.as_array().unwrap().iter().find(|o| o["id"] == "other-1").unwrap();
    assert_eq!((other["ok"].clone(), other["error"].clone()), (Value::Bool(false), Value::from("lost")));
    let out = console(&url, &["ping", "no-such-device"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn console_lists_shows_configures_and_clears() {
    let m = Mosquitto::start();
    let _a = agent("dev-c", m.port, &["lab"]);
    let obs = Observer::connect(m.port, &["debfleet/device/+/status"]);
    online(&obs, "dev-c");
    let url = m.url();

    let v = stdout_json(&console(&url, &["devices", "--json"]));
    assert_eq!(v[0]["id"], "dev-c");
    assert_eq!(v[0]["status"], "online");
    assert_eq!(v[0]["groups"], serde_json::json!(["lab"]));
    let text = String::from_utf8_lossy(&console(&url, &["devices"]).stdout).into_owned();
    assert!(text.lines().next().unwrap().starts_with("DEVICE  STATUS"), "{text}");

    let out = console(&url, &["cfg", "set", "dev-c", "telemetry.cpu.interval_s=2", "logs.level=debug", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout_json(&out)["telemetry"]["cpu"]["interval_s"], 2);
    let v = stdout_json(&console(&url, &["cfg", "get", "dev-c", "--json"]));
    assert_eq!(
        (v["telemetry"]["cpu"]["interval_s"].clone(), v["logs"]["level"].clone()),
        (Value::from(2), Value::from("debug"))
    );
    let out = console(&url, &["cfg", "set", "dev-c", "telemetry.cpu.nope=1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("telemetry.cpu.nope"));

    let v = stdout_json(&console(&url, &["show", "dev-c", "--json"]));
    assert_eq!(v["meta"]["device_id"], "dev-c");
    assert_eq!(v["status"]["state"], "online");
    assert_eq!(v["cfg"]["telemetry"]["cpu"]["interval_s"], 2);
    assert!(v["packages"]["packages"].is_object());
    // Telemetry is retained: show sees the latest sample (the first comes a second after start).
    let v = wait_for(T, "telemetry in show", || {
        let v = stdout_json(&console(&url, &["show", "dev-c", "--json"]));
        v["telemetry"]["cpu"].is_number().then_some(v)
    });
    let cpu = v["telemetry"]["cpu"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu));

    let ops = stdout_json(&console(&url, &["ops", "dev-c", "--json"]));
    assert!(ops.as_array().unwrap().iter().any(|o| o["verb"] == "cfg" && o["state"] == "succeeded"));
    let out = console(&url, &["ops", "dev-c", "--clear"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ops = stdout_json(&console(&url, &["ops", "dev-c", "--json"]));
    assert!(ops.as_array().unwrap().iter().all(|o| o["verb"] == "clear"), "{ops}");

    let out = console("mqtt://127.0.0.1:1", &["devices"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the broker"));
}

#[test]
fn runtime_cfg_gates_telemetry_and_logs_and_survives_restart() {
    let m = Mosquitto::start();
    let extra = "[telemetry.cpu]\ninterval_s = 1\nthreshold = 0\n[logs]\nbatch_s = 1\n";
    let mut a = Agent::start(AgentSpec { id: "dev-t", port: m.port, groups: &[], extra });
    let obs = Observer::connect(m.port, &["debfleet/device/dev-t/#"]);
    online(&obs, "dev-t");
    obs.wait("debfleet/device/dev-t/telemetry", T, |v| v["cpu"].is_number());
    obs.publish("debfleet/device/dev-t/cmd/ping", r#"{"id":"log-me"}"#, false);
    obs.wait("debfleet/device/dev-t/logs", T, |v| {
        v["lines"].as_array().unwrap().iter().any(|l| l["msg"].as_str().unwrap().contains("running ping"))
    });
    obs.publish(
        "debfleet/device/dev-t/cmd/cfg",
        r#"{"id":"quiet","set":{"telemetry":{"cpu":{"enabled":false},"memory":{"enabled":false},"disk":{"enabled":false}},"logs":{"enabled":false}}}"#,
        false,
    );
    op_final(&obs, "dev-t", "quiet");
    std::thread::sleep(Duration::from_millis(1500));
    obs.clear();
    std::thread::sleep(Duration::from_millis(2500));
    let noisy: Vec<String> = obs
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/telemetry") || m.topic.ends_with("/logs"))
        .map(|m| m.topic.clone())
        .collect();
    assert!(noisy.is_empty(), "disabled but still sent: {noisy:?}");
    // The change was persisted: it holds after a restart.
    a.signal(libc_sigterm());
    a.wait_exit(Duration::from_secs(10));
    obs.clear();
    a.spawn();
    let cfg = obs.wait("debfleet/device/dev-t/cfg", T, |_| true);
    assert_eq!(cfg["telemetry"]["cpu"]["enabled"], false);
    assert_eq!(cfg["logs"]["enabled"], false);
}

#[test]
fn watch_streams_changes_as_ndjson() {
    let m = Mosquitto::start();
    let mut a = agent("dev-w", m.port, &["lab"]);
    let obs = Observer::connect(m.port, &["debfleet/device/+/status"]);
    online(&obs, "dev-w");
    let out_path = a.dir.path().join("watch.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut watch = std::process::Command::new(bin("debfleet"))
        .args(["watch", "--group", "lab", "--json"])
        .env("DEBFLEET_BROKER", m.url())
        .stdout(out)
        .spawn()
        .unwrap();
    // Wait until watch is subscribed: a ping's operation shows up in its output.
    let lines = wait_for(T, "watch output", || {
        obs.publish("debfleet/device/dev-w/cmd/ping", format!(r#"{{"id":"w-{}"}}"#, rand_id()), false);
        std::thread::sleep(Duration::from_millis(200));
        let text = std::fs::read_to_string(&out_path).unwrap();
        text.contains("\"op\"").then_some(())
    });
    let _ = lines;
    a.kill9();
    let lost = wait_for(T, "lost in watch output", || {
        let text = std::fs::read_to_string(&out_path).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("NDJSON"))
            .find(|v| v["kind"] == "status" && v["data"]["state"] == "lost")
    });
    assert_eq!(lost["device"], "dev-w");
    unsafe_kill(watch.id() as i32, 2);
    assert!(watch.wait().unwrap().success());
}

fn rand_id() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn unsafe_kill(pid: i32, sig: i32) {
    std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
}

#[test]
fn bad_config_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    for (text, key) in [
        ("device_id = \"UPPER\"\nbroker = \"mqtt://127.0.0.1:1\"\n", "device_id"),
        (
            "device_id = \"d\"\nbroker = \"mqtt://127.0.0.1:1\"\ntelemetry = { cpu = { interval_s = 0 } }\n",
            "telemetry.cpu.interval_s",
        ),
        ("device_id = \"d\"\nbroker = \"mqtt://127.0.0.1:1\"\nunknown_key = 1\n", "unknown_key"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new(bin("debfleet-agent")).arg("--config").arg(&cfg).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key}: {err}");
    }
    let out = std::process::Command::new(bin("debfleet-agent"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn embedded_broker_serves_a_fleet() {
    let port = free_port();
    let web_port = free_port();
    let files = tempfile::tempdir().unwrap();
    let users = files.path().join("users");
    let audit = files.path().join("audit.log");
    let mut serve = embedded_broker_with(
        port,
        &[
            "--web-listen",
            &format!("127.0.0.1:{web_port}"),
            "--users",
            users.to_str().unwrap(),
            "--audit",
            audit.to_str().unwrap(),
        ],
    );
    let url = format!("mqtt://127.0.0.1:{port}");
    let _a = agent("emb-1", port, &["lab"]);
    let v = wait_for(T, "the device in the list", || {
        let v = stdout_json(&console(&url, &["devices", "--json"]));
        (v[0]["status"] == "online").then_some(v)
    });
    assert_eq!(v[0]["id"], "emb-1");
    let out = console(&url, &["ping", "--group", "lab", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout_json(&out)[0]["ok"], true);
    // `serve` runs the rollout controller too: a rollout to a group without devices is taken and
    // halted with why.
    let out = console(&url, &["rollout", "create", "--group", "nobody", "--id", "empty", "app=1.0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = wait_for(T, "the controller's verdict", || {
        let v = stdout_json(&console(&url, &["rollout", "status", "empty", "--json"]));
        (v["state"]["phase"] == "halted").then_some(v)
    });
    assert!(s["state"]["reason"].as_str().unwrap().contains("has no devices"), "{s}");
    // ... and the web console: a user added while it runs signs in and sees the device.
    repo::add_web_user(&bin("debfleet"), &users, "ana", "viewer", "ana-password");
    let page = repo::web_page_as(web_port, "ana", "ana-password", "/");
    assert!(page.contains("emb-1"), "{page}");
    // SIGTERM (what systemd sends) stops all of it.
    Command::new("kill").arg("-TERM").arg(serve.id().to_string()).status().unwrap();
    let status = wait_for(Duration::from_secs(10), "serve to stop on SIGTERM", || serve.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
}

#[test]
fn agent_and_console_speak_tls_with_a_ca_file() {
    let (m, ca) = Mosquitto::start_tls();
    let url = format!("mqtts://127.0.0.1:{}", m.port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    std::fs::write(&cfg, format!("device_id = \"tls-1\"\nbroker = {url:?}\nca_file = {ca:?}\nstate_dir = {state:?}\n"))
        .unwrap();
    let mut agent = std::process::Command::new(bin("debfleet-agent"))
        .arg("--config")
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(bin("debfleet"))
            .args(args)
            .env("DEBFLEET_BROKER", &url)
            .env("DEBFLEET_CA_FILE", &ca)
            .output()
            .unwrap()
    };
    let v = wait_for(T, "the TLS device", || {
        let out = run(&["devices", "--json"]);
        out.status.success().then(|| stdout_json(&out)).filter(|v| v[0]["status"] == "online")
    });
    assert_eq!(v[0]["id"], "tls-1");
    assert_eq!(stdout_json(&run(&["ping", "tls-1", "--json"]))[0]["ok"], true);
    // Without the CA the console refuses to talk TLS at all.
    let out =
        std::process::Command::new(bin("debfleet")).args(["devices"]).env("DEBFLEET_BROKER", &url).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));
    let _ = agent.kill();
    let _ = agent.wait();
}
