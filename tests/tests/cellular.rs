//! The cellular profile (issue 12): a kept MQTT session that republishes only what changed,
//! commands queued by the broker while the device was away and stale ones refused as `expired`,
//! the profile switched at runtime, and ten forced disconnects over a delayed, lossy link into a
//! network namespace (see `debfleet_tests::netem`) that lose no operation result and keep the
//! on-disk outbox within its bound.
//! Real Mosquitto, real agents (a host process, and the .deb in a lab device).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use debfleet_tests::lab::Device;
use debfleet_tests::netem::{Netns, NsBroker};
use debfleet_tests::repo::RepoServer;
use debfleet_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn topics_since(obs: &Observer, id: &str) -> Vec<String> {
    let prefix = format!("debfleet/device/{id}/");
    obs.messages().into_iter().filter_map(|m| m.topic.strip_prefix(&prefix).map(str::to_owned)).collect()
}

#[test]
fn a_cellular_device_keeps_its_session_sends_only_what_changed_and_refuses_stale_commands() {
    let m = Mosquitto::start();
    let proxy = Proxy::start(m.port);
    let extra = "profile = \"cellular\"\n[link]\nkeepalive_s = 5\n";
    let mut a = Agent::start(AgentSpec { id: "cell-1", port: proxy.port, groups: &["lab"], extra });
    let obs = Observer::connect(m.port, &["debfleet/device/cell-1/#"]);
    obs.wait("debfleet/device/cell-1/status", T, |v| v["state"] == "online");
    let cfg = obs.wait("debfleet/device/cell-1/cfg", T, |_| true);
    assert_eq!(cfg["profile"], "cellular");
    assert_eq!((cfg["logs"]["level"].as_str(), cfg["link"]["keepalive_s"].as_u64()), (Some("warn"), Some(5)));
    assert_eq!(cfg["link"]["persistent_session"], true);
    assert!(cfg["telemetry"]["window_s"].as_u64() > Some(0));
    let link = obs.wait("debfleet/device/cell-1/state/link", T, |_| true);
    assert_eq!((link["profile"].as_str(), link["session_present"].as_bool()), (Some("cellular"), Some(false)));
    assert_eq!(link["mqtt"], 5, "Mosquitto speaks MQTT 5: {link}");

    // The connection breaks: the broker kept the session, so the agent neither resubscribes nor
    // sends its unchanged facts again — only its status (the last will replaced it) and the
    // link report.
    obs.clear();
    proxy.cut_all();
    let link = obs.wait("debfleet/device/cell-1/state/link", T, |v| v["session_present"] == true);
    assert!(link["reconnects"].as_u64() >= Some(1), "{link}");
    obs.wait("debfleet/device/cell-1/status", T, |v| v["state"] == "online");
    std::thread::sleep(Duration::from_millis(500));
    let sent = topics_since(&obs, "cell-1");
    assert!(
        sent.iter().all(|t| t == "status" || t == "state/link"),
        "a kept session got facts again: {sent:?}\n{}",
        a.log()
    );
    // Still subscribed (through the kept session): a command gets through.
    obs.publish("debfleet/device/cell-1/cmd/ping", br#"{"id":"after-cut"}"#.to_vec(), false);
    obs.wait("debfleet/device/cell-1/op/after-cut", T, |v| v["state"] == "succeeded");

    // While the agent is down, the broker queues what is sent to it. A command still fresh
    // when it arrives runs; last week's install does not.
    a.kill9();
    obs.wait("debfleet/device/cell-1/status", T, |v| v["state"] == "lost");
    let fresh = format!(r#"{{"id":"queued-1","expires_at":"{}"}}"#, later(600));
    obs.publish("debfleet/device/cell-1/cmd/ping", fresh.into_bytes(), false);
    let stale = br#"{"id":"stale-1","packages":["hello"],"expires_at":"2026-01-01T00:00:00.000Z"}"#;
    obs.publish("debfleet/group/lab/cmd/install", stale.to_vec(), false);
    // A group command from the console while it is away, good for 2 s: another member answers;
    // under MQTT 5 the broker drops it for the absent one when those 2 s are up.
    let _b = Agent::start(AgentSpec { id: "cell-2", port: m.port, groups: &["lab"], extra: "" });
    let obs2 = Observer::connect(m.port, &["debfleet/device/cell-2/status"]);
    obs2.wait("debfleet/device/cell-2/status", T, |v| v["state"] == "online");
    let out = console(&m.url(), &["--expires", "2", "ping", "--group", "lab", "--timeout", "5", "--json"]);
    let pinged = stdout_json(&out);
    let by_id = |id: &str| pinged.as_array().unwrap().iter().find(|o| o["id"] == id).cloned().unwrap();
    assert_eq!(
        (by_id("cell-2")["ok"].as_bool(), by_id("cell-1")["error"].as_str()),
        (Some(true), Some("lost")),
        "{pinged}"
    );
    std::thread::sleep(Duration::from_secs(3));
    a.spawn();
    let q = obs.wait("debfleet/device/cell-1/op/queued-1", T, |v| v["state"] == "succeeded");
    assert_eq!(q["verb"], "ping");
    let s = obs.wait("debfleet/device/cell-1/op/stale-1", T, |v| v["state"] != "accepted");
    assert_eq!((s["state"].as_str(), s["error"]["code"].as_str()), (Some("expired"), Some("expired")), "{s}");
    assert!(s["error"]["message"].as_str().unwrap().contains("2026-01-01"), "{s}");
    assert!(a.log().contains("expired"), "{}", a.log());
    // The console's ping never reached it: the broker dropped it unsent (a late delivery would
    // have left an `expired` record).
    std::thread::sleep(Duration::from_secs(1));
    let late: Vec<String> = topics_since(&obs, "cell-1").into_iter().filter(|t| t.starts_with("op/ping-")).collect();
    assert!(late.is_empty(), "the expired group ping reached the device: {late:?}");

    // Back to the default profile at runtime: a new connection with a clean session, the
    // default profile's keys except the keepalive the file sets itself; the console shows the
    // link.
    let out = console(&m.url(), &["cfg", "set", "cell-1", "profile=default"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let link = obs
        .wait("debfleet/device/cell-1/state/link", T, |v| v["profile"] == "default" && v["session_present"] == false);
    assert_eq!((link["keepalive_s"].as_u64(), link["session_present"].as_bool()), (Some(5), Some(false)), "{link}");
    let cfg = obs.last("debfleet/device/cell-1/cfg").unwrap().json();
    // Keys at the default profile's value are left out of `cfg` (0: no aggregation).
    assert_eq!((cfg["logs"]["level"].as_str(), cfg["telemetry"]["window_s"].as_u64()), (Some("info"), None));
    assert!(cfg.get("profile").is_none() && cfg.get("budget").is_none(), "{cfg}");
    let full = stdout_json(&console(&m.url(), &["cfg", "get", "cell-1", "--json"]));
    assert_eq!(
        (full["profile"].as_str(), full["telemetry"]["window_s"].as_u64()),
        (Some("default"), Some(0)),
        "{full}"
    );
    let show = console(&m.url(), &["show", "cell-1"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("LINK") && text.contains("control") && text.contains("reconnects"), "{text}");
    let json = stdout_json(&console(&m.url(), &["show", "cell-1", "--json"]));
    assert!(json["link"]["classes"]["result"]["sent"].as_u64() > Some(0), "{json}");
}

#[test]
fn mqtt_5_falls_back_to_3_1_1_on_a_broker_without_it_and_can_be_pinned() {
    // The embedded broker speaks 3.1.1 only: the agent notices at its first connect.
    let port = free_port();
    let mut serve = embedded_broker(port);
    let a = Agent::start(AgentSpec { id: "v4-only", port, groups: &["lab"], extra: "profile = \"cellular\"\n" });
    let obs = Observer::connect(port, &["debfleet/device/v4-only/#"]);
    let link = obs.wait("debfleet/device/v4-only/state/link", T, |_| true);
    assert_eq!(link["mqtt"], 4, "{link}");
    assert!(a.log().contains("did not accept MQTT 5"), "{}", a.log());
    obs.publish("debfleet/device/v4-only/cmd/ping", br#"{"id":"p-v4"}"#.to_vec(), false);
    obs.wait("debfleet/device/v4-only/op/p-v4", T, |v| v["state"] == "succeeded");
    let _ = serve.kill();
    let _ = serve.wait();

    // `mqtt = "3.1.1"` keeps a broker that has 5 on 3.1.1.
    let m = Mosquitto::start();
    let _b = Agent::start(AgentSpec {
        id: "pinned",
        port: m.port,
        groups: &["lab"],
        extra: "profile = \"cellular\"\nmqtt = \"3.1.1\"\n",
    });
    let obs = Observer::connect(m.port, &["debfleet/device/pinned/state/link"]);
    assert_eq!(obs.wait("debfleet/device/pinned/state/link", T, |_| true)["mqtt"], 4);
}

/// An RFC 3339 time `secs` from now.
fn later(secs: i64) -> String {
    debfleet_protocol::time::format_unix_ms(debfleet_protocol::time::now_unix_ms() + secs * 1000)
}

fn final_state(v: &Value) -> bool {
    matches!(v["state"].as_str(), Some("succeeded" | "failed" | "expired"))
}

/// Bytes of the device's on-disk outbox.
fn outbox_bytes(dev: &Device) -> u64 {
    let out = dev.exec(&["sh", "-c", "cat /var/lib/debfleet/outbox/*.seg 2>/dev/null | wc -c"]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[test]
fn ten_forced_disconnects_through_netem_lose_no_result_and_keep_the_outbox_bounded() {
    let ns = Netns::create();
    ns.impair(Duration::from_millis(60), Duration::from_millis(40), 2.0);
    let broker = NsBroker::start(&ns);
    let obs = Observer::connect_to(&ns.clean_addr, broker.port, &["debfleet/device/+/#"]);
    let repo = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let deb = debfleet_tests::repo::service_deb(work.path(), "demo-app", "1.0", false);
    assert!(repo.publish(&deb, "stable").status.success());

    let name = "cl-1";
    let dev = Device::boot(name);
    // Kept session, unchanged facts skipped: the path with the most to get wrong. Telemetry
    // every second and info logs, so there is always something to keep while the link is down;
    // a 4 KiB outbox, so the longest outage overflows it.
    let max_kb = 4;
    dev.install_agent(
        &format!(
            "broker = \"mqtt://{}:{}\"\nstate_dir = \"/var/lib/debfleet\"\ngroups = [\"lab\"]\n\n\
             [link]\nkeepalive_s = 5\npersistent_session = true\nskip_unchanged = true\n\n\
             [telemetry.cpu]\ninterval_s = 1\nthreshold = 0.0\n\n[logs]\nlevel = \"info\"\nbatch_s = 1\n\n\
             [outbox]\nmax_kb = {max_kb}\ndrain_per_s = 50\n\n[reconnect]\ninitial_delay_ms = 200\nmax_delay_s = 2\n\n\
             [apt]\nwatch_s = 2\n",
            ns.device_addr, broker.port
        ),
        &repo,
    );
    let status = format!("debfleet/device/{name}/status");
    obs.wait(&status, Duration::from_secs(60), |v| v["state"] == "online");

    // Ten outages, each long enough for the agent's keepalive to notice (over 3 × 5 s); one of
    // two minutes, longer than the outbox holds. Each starts just after a command was sent, so its
    // result is produced while the link is down.
    let mut ids = Vec::new();
    let mut downs: Vec<(i64, i64)> = Vec::new();
    let mut max_outbox = 0;
    for i in 0..10 {
        let id = format!("net-{i}");
        let (verb, payload) = match i % 3 {
            0 => ("install", format!(r#"{{"id":"{id}","packages":["demo-app"]}}"#)),
            1 => ("uninstall", format!(r#"{{"id":"{id}","packages":["demo-app"]}}"#)),
            _ => ("ping", format!(r#"{{"id":"{id}"}}"#)),
        };
        obs.publish(&format!("debfleet/device/{name}/cmd/{verb}"), payload.into_bytes(), false);
        ids.push(id.clone());
        obs.wait(&format!("debfleet/device/{name}/op/{id}"), T, |_| true);
        let down_s = if i == 5 { 120 } else { 16 };
        let from = debfleet_protocol::time::now_unix_ms();
        ns.link(false);
        let until = Instant::now() + Duration::from_secs(down_s);
        while Instant::now() < until {
            max_outbox = max_outbox.max(outbox_bytes(&dev));
            std::thread::sleep(Duration::from_secs(1));
        }
        ns.link(true);
        downs.push((from, debfleet_protocol::time::now_unix_ms()));
        // Back online before the next round.
        let since = obs.messages().len();
        wait_for(Duration::from_secs(30), "the agent back online", || {
            obs.messages()[since..].iter().any(|m| m.topic == status && m.json()["state"] == "online").then_some(())
        });
    }

    // Every operation has its final record on the broker, as the device's journal says.
    let results: BTreeMap<String, Value> = ids
        .iter()
        .map(|id| {
            (id.clone(), obs.wait(&format!("debfleet/device/{name}/op/{id}"), Duration::from_secs(90), final_state))
        })
        .collect();
    for (id, r) in &results {
        assert_eq!(r["state"], "succeeded", "{id}: {r}");
        let journal = dev.ok(&["cat", &format!("/var/lib/debfleet/ops/{id}.json")]);
        assert!(journal.contains("succeeded"), "{id}: {journal}");
    }
    // A fresh reader of the retained set sees them too (not only what was streamed).
    let reader = Observer::connect_to(&ns.clean_addr, broker.port, &[&format!("debfleet/device/{name}/op/+")]);
    let deadline = Instant::now() + T;
    loop {
        let retained: BTreeMap<String, String> = reader
            .messages()
            .iter()
            .filter(|m| m.retain)
            .map(|m| (m.topic.clone(), m.json()["state"].as_str().unwrap_or("(deleted)").to_owned()))
            .collect();
        if ids
            .iter()
            .all(|id| retained.get(&format!("debfleet/device/{name}/op/{id}")).is_some_and(|s| s == "succeeded"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "not every result is retained: {retained:?}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The outbox stayed within its bound (plus at most one record past it on disk while a
    // segment is cut), overflowed in the long outage, counted what it dropped, and drained.
    assert!(max_outbox <= (max_kb + 1) * 1024, "outbox reached {max_outbox} bytes");
    let link = wait_for(Duration::from_secs(60), "the outbox drained", || {
        let l = obs.last(&format!("debfleet/device/{name}/state/link"))?.json();
        (l["outbox"] == 0).then_some(l)
    });
    let _ = link;
    // The report is published on events (a drained outbox), not on every reconnect with the
    // default profile: a refresh publishes a current one.
    obs.publish(&format!("debfleet/device/{name}/cmd/refresh"), br#"{"id":"net-refresh"}"#.to_vec(), false);
    obs.wait(&format!("debfleet/device/{name}/op/net-refresh"), Duration::from_secs(60), |v| v["state"] == "succeeded");
    let out = console(&format!("mqtt://{}:{}", ns.clean_addr, broker.port), &["show", name, "--json"]);
    let link = stdout_json(&out)["link"].clone();
    assert!(link["reconnects"].as_u64() >= Some(10), "{link}");
    assert!(link["dropped"].as_u64() > Some(0), "the two-minute outage overflowed the outbox: {link}");
    assert!(link["classes"]["telemetry"]["sent"].as_u64() > Some(0), "{link}");
    // Telemetry sampled while the link was down reached the broker afterwards, with the time
    // it was sampled.
    let topic = format!("debfleet/device/{name}/telemetry");
    let kept = obs
        .messages()
        .iter()
        .filter(|m| m.topic == topic)
        .filter_map(|m| debfleet_protocol::time::parse_unix_ms(m.json()["ts"].as_str()?))
        .filter(|ts| downs.iter().any(|(a, b)| ts > a && ts < b))
        .count();
    assert!(kept >= 10, "only {kept} samples from the outages arrived");
    let log = dev.exec(&["journalctl", "-u", "debfleet-agent", "--no-pager"]);
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(!log.contains("panicked"), "{log}");
}
