//! Regression tests for the defects hostile input found in the core (issue 9): oversized and
//! retained commands, bursts, the retained telemetry view, a lost device's age, and the
//! broker configuration we ship. Real Mosquitto, real agent and console processes.

use std::time::{Duration, Instant};

use debfleet_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

fn agent(id: &str, port: u16, extra: &str) -> Agent {
    Agent::start(AgentSpec { id, port, groups: &["lab"], extra })
}

fn online(obs: &Observer, id: &str) -> Value {
    obs.wait(&format!("debfleet/device/{id}/status"), T, |v| v["state"] == "online")
}

fn op_final(obs: &Observer, id: &str, op: &str) -> Value {
    obs.wait(&format!("debfleet/device/{id}/op/{op}"), T, |v| v["state"] == "succeeded" || v["state"] == "failed")
}

fn onlines(obs: &Observer, id: &str) -> usize {
    let topic = format!("debfleet/device/{id}/status");
    obs.messages().iter().filter(|m| m.topic == topic && m.json()["state"] == "online").count()
}

fn rejections(obs: &Observer, id: &str) -> Vec<Value> {
    let topic = format!("debfleet/device/{id}/rejected");
    obs.messages().iter().filter(|m| m.topic == topic).map(|m| m.json()).collect()
}

#[test]
fn oversized_messages_are_refused_at_the_broker_and_the_agent_stays_connected() {
    let m = Mosquitto::start();
    let a = agent("dev-o", m.port, "");
    let obs = Observer::connect(m.port, &["debfleet/device/dev-o/#"]);
    online(&obs, "dev-o");

    // Over the broker's cap, retained, on the fleet's topic: Mosquitto refuses it (and drops the
    // sender), so no device ever receives it, now or on a reconnect.
    let huge = format!(r#"{{"id":"huge-1","pad":"{}"}}"#, "x".repeat(1_100_000));
    let sender = Observer::connect(m.port, &[]);
    sender.publish("debfleet/fleet/cmd/ping", huge.into_bytes(), true);
    // Under the cap but far over the command limit, live and retained.
    let big = format!(r#"{{"id":"big-1","pad":"{}"}}"#, "x".repeat(200_000));
    let sender2 = Observer::connect(m.port, &[]);
    sender2.publish("debfleet/fleet/cmd/ping", big.into_bytes(), true);
    let r = obs.wait("debfleet/device/dev-o/rejected", T, |v| v["code"] == "payload_too_large");
    assert!(r["message"].as_str().unwrap().contains("limit"), "{r}");

    // Still on the same connection, still answering.
    obs.publish("debfleet/device/dev-o/cmd/ping", br#"{"id":"alive-1"}"#.to_vec(), false);
    assert_eq!(op_final(&obs, "dev-o", "alive-1")["state"], "succeeded");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(onlines(&obs, "dev-o"), 1, "the agent reconnected:\n{}", a.log());
    assert!(!a.log().contains("connection to the broker lost"), "{}", a.log());

    // A second device joining later gets the retained 200 KB command: refused once, as
    // retained, and it stays connected too.
    let b = agent("dev-p", m.port, "");
    let obs_b = Observer::connect(m.port, &["debfleet/device/dev-p/#"]);
    online(&obs_b, "dev-p");
    obs_b.wait("debfleet/device/dev-p/rejected", T, |v| v["code"] == "retained_command");
    obs_b.publish("debfleet/device/dev-p/cmd/ping", br#"{"id":"alive-2"}"#.to_vec(), false);
    assert_eq!(op_final(&obs_b, "dev-p", "alive-2")["state"], "succeeded");
    assert!(!b.log().contains("connection to the broker lost"), "{}", b.log());
    assert_eq!(onlines(&obs_b, "dev-p"), 1);
}

#[test]
fn retained_commands_run_on_no_device_that_connects_later() {
    let m = Mosquitto::start();
    let sender = Observer::connect(m.port, &[]);
    sender.publish("debfleet/fleet/cmd/ping", br#"{"id":"ret-1"}"#.to_vec(), true);
    sender.publish("debfleet/group/lab/cmd/cfg", br#"{"id":"ret-2","set":{"logs":{"level":"debug"}}}"#.to_vec(), true);
    std::thread::sleep(Duration::from_millis(300));

    let mut a = agent("dev-r", m.port, "");
    let obs = Observer::connect(m.port, &["debfleet/device/dev-r/#"]);
    online(&obs, "dev-r");
    wait_for(T, "two retained_command rejections", || {
        (rejections(&obs, "dev-r").iter().filter(|r| r["code"] == "retained_command").count() == 2).then_some(())
    });
    // Nothing ran: no operation records, configuration untouched.
    obs.publish("debfleet/device/dev-r/cmd/ping", br#"{"id":"alive-1"}"#.to_vec(), false);
    op_final(&obs, "dev-r", "alive-1");
    let topics: Vec<String> = obs.messages().into_iter().map(|m| m.topic).collect();
    assert!(!topics.iter().any(|t| t.ends_with("/op/ret-1") || t.ends_with("/op/ret-2")), "{topics:?}");
    assert_eq!(obs.last("debfleet/device/dev-r/cfg").unwrap().json()["logs"]["level"], "info");

    // After a restart they arrive again (still retained): reported once per agent run, and
    // still not run.
    a.kill9();
    obs.wait("debfleet/device/dev-r/status", T, |v| v["state"] == "lost");
    obs.clear();
    a.spawn();
    online(&obs, "dev-r");
    obs.publish("debfleet/device/dev-r/cmd/ping", br#"{"id":"alive-2"}"#.to_vec(), false);
    op_final(&obs, "dev-r", "alive-2");
    assert!(!obs.messages().iter().any(|m| m.topic.ends_with("/op/ret-1")));

    // Clearing the retained commands (empty retained payloads) is not malformed JSON.
    obs.clear();
    sender.publish("debfleet/fleet/cmd/ping", Vec::new(), true);
    sender.publish("debfleet/group/lab/cmd/cfg", Vec::new(), true);
    obs.publish("debfleet/device/dev-r/cmd/ping", br#"{"id":"alive-3"}"#.to_vec(), false);
    op_final(&obs, "dev-r", "alive-3");
    std::thread::sleep(Duration::from_millis(300));
    assert!(rejections(&obs, "dev-r").is_empty(), "{:?}", rejections(&obs, "dev-r"));
}

#[test]
fn a_burst_of_500_commands_gets_500_final_records() {
    let m = Mosquitto::start();
    let a = agent("dev-burst", m.port, "");
    let obs = Observer::connect(m.port, &["debfleet/device/dev-burst/op/+"]);
    let st = Observer::connect(m.port, &["debfleet/device/dev-burst/status"]);
    online(&st, "dev-burst");
    let started = Instant::now();
    for i in 0..500 {
        obs.publish("debfleet/device/dev-burst/cmd/ping", format!(r#"{{"id":"b-{i}"}}"#).into_bytes(), false);
    }
    let finals = wait_for(Duration::from_secs(120), "a final record for every command", || {
        let mut done = std::collections::BTreeMap::new();
        for m in obs.messages() {
            let v = m.json();
            if v["state"] == "succeeded" || v["state"] == "failed" {
                done.insert(v["id"].as_str().unwrap_or("").to_owned(), v);
            }
        }
        (done.len() == 500).then_some(done)
    });
    let busy = finals.values().filter(|v| v["error"]["code"] == "busy").count();
    let ok = finals.values().filter(|v| v["state"] == "succeeded").count();
    assert_eq!(ok + busy, 500, "every command either ran or was refused as busy");
    assert!(ok > 0);
    eprintln!("500 pings: {ok} succeeded, {busy} busy, in {:?}", started.elapsed());
    assert_eq!(onlines(&st, "dev-burst"), 1, "no reconnect: {}", a.log());
}

#[test]
fn show_json_always_has_cpu_memory_and_disk_once_sampled() {
    let m = Mosquitto::start();
    let extra = "[telemetry.cpu]\ninterval_s = 1\nthreshold = 0.0\n\n[telemetry.memory]\ninterval_s = 3600\n\n[telemetry.disk]\ninterval_s = 3600\n";
    let _a = agent("dev-t", m.port, extra);
    let obs = Observer::connect(m.port, &["debfleet/device/dev-t/telemetry"]);
    // Several CPU-only samples after the first full one.
    wait_for(T, "four telemetry messages", || {
        (obs.messages().iter().filter(|m| m.topic.ends_with("/telemetry")).count() >= 4).then_some(())
    });
    let out = console(&m.url(), &["show", "dev-t", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = &stdout_json(&out)["telemetry"];
    assert!(t["cpu"].is_number() && t["memory"].is_number() && t["disk"]["/"].is_number(), "{t}");
    assert!(t["at"]["memory"].as_str().unwrap() < t["at"]["cpu"].as_str().unwrap(), "{t}");
}

#[test]
fn a_lost_device_is_dated_by_when_it_was_last_heard() {
    let m = Mosquitto::start();
    let extra = "[telemetry.cpu]\ninterval_s = 1\nthreshold = 0.0\n";
    let mut a = agent("dev-l", m.port, extra);
    let obs = Observer::connect(m.port, &["debfleet/device/dev-l/#"]);
    let status = online(&obs, "dev-l");
    // Connected for a while, then gone.
    std::thread::sleep(Duration::from_secs(4));
    a.kill9();
    obs.wait("debfleet/device/dev-l/status", T, |v| v["state"] == "lost");
    let v = stdout_json(&console(&m.url(), &["devices", "--json"]));
    let d = &v[0];
    assert_eq!(d["status"], "lost");
    assert_eq!(d["since"], status["since"]);
    assert!(d["last_heard"].as_str().unwrap() > status["since"].as_str().unwrap(), "{d}");
    let text = String::from_utf8_lossy(&console(&m.url(), &["show", "dev-l"]).stdout).into_owned();
    assert!(text.contains("last heard"), "{text}");
}

#[test]
fn the_fleet_read_is_complete_when_retained_messages_arrive_after_the_marker() {
    let m = Mosquitto::start();
    let agents: Vec<Agent> = ["dev-e1", "dev-e2", "dev-e3"].iter().map(|id| agent(id, m.port, "")).collect();
    let obs = Observer::connect(m.port, &["debfleet/device/+/status"]);
    for a in &agents {
        online(&obs, &a.id);
    }
    let ids = |out: &std::process::Output| -> Vec<String> {
        let v = stdout_json(out);
        v.as_array()
            .unwrap()
            .iter()
            .filter(|d| d["agent_version"].is_string())
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Through a proxy that, when told to, delivers every retained message a second late (the
    // console's marker first). A first read while it does not: it writes the fleet index.
    let proxy = RetainDelayProxy::start(m.port, Duration::from_millis(1000));
    let url = format!("mqtt://127.0.0.1:{}", proxy.port);
    proxy.delaying(false);
    let out = console(&url, &["devices", "--json"]);
    assert_eq!(ids(&out), ["dev-e1", "dev-e2", "dev-e3"]);
    // Now late: the read still waits for the index and every device it names, each complete.
    proxy.delaying(true);
    let out = console(&url, &["devices", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ids(&out), ["dev-e1", "dev-e2", "dev-e3"], "{}", String::from_utf8_lossy(&out.stderr));
    let out = console(&url, &["show", "dev-e2", "--json"]);
    assert_eq!(stdout_json(&out)["meta"]["device_id"], "dev-e2");
}

#[test]
fn a_slow_disk_does_not_stall_the_connection() {
    let m = Mosquitto::start();
    // Every durable write takes 14 s, well over the broker's 7.5 s allowance for a 5 s keepalive.
    let spec = AgentSpec { id: "dev-slow", port: m.port, groups: &[], extra: "keep_alive_s = 5\n" };
    let a = Agent::start_with_env(spec, &[("DEBFLEET_AGENT_FLUSH_DELAY_MS", "14000")]);
    let obs = Observer::connect(m.port, &["debfleet/device/dev-slow/#"]);
    online(&obs, "dev-slow");
    // A cfg change is flushed to disk (14 s, on the agent's loop); the connection's own thread
    // keeps the keepalives going meanwhile.
    obs.publish("debfleet/device/dev-slow/cmd/cfg", br#"{"id":"c-1","set":{"logs":{"level":"warn"}}}"#.to_vec(), false);
    let rec = obs.wait("debfleet/device/dev-slow/op/c-1", Duration::from_secs(40), |v| v["state"] == "succeeded");
    assert_eq!(rec["result"]["logs"]["level"], "warn");
    let statuses: Vec<Value> =
        obs.messages().iter().filter(|m| m.topic.ends_with("/status")).map(|m| m.json()).collect();
    assert!(statuses.iter().all(|s| s["state"] == "online"), "the broker gave up on the agent: {statuses:?}");
    assert_eq!(onlines(&obs, "dev-slow"), 1, "{}", a.log());
}

/// TCP_NODELAY as the agent's own socket to the broker has it, read from outside: the socket is
/// duplicated out of the agent's process (pidfd_getfd, root) and asked.
fn nodelay_of_socket_to(pid: i32, port: u16) -> Option<bool> {
    // The agent's socket inodes, then the one whose remote end is the broker's port.
    let inodes: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned();
            Some((fd, inode))
        })
        .collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let fd = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let remote_port = u16::from_str_radix(f.get(2)?.split(':').nth(1)?, 16).ok()?;
        let inode = f.get(9)?;
        (remote_port == port).then(|| inodes.iter().find(|(_, i)| i == inode).map(|(fd, _)| *fd)).flatten()
    })?;
    // SAFETY: plain system calls on descriptors this function owns (closed below).
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            return None;
        }
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        libc::close(pidfd);
        if dup < 0 {
            return None;
        }
        let mut on: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let r =
            libc::getsockopt(dup, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&mut on as *mut libc::c_int).cast(), &mut len);
        libc::close(dup);
        (r == 0).then_some(on != 0)
    }
}

#[test]
fn the_agents_broker_socket_does_not_wait_for_delayed_acks() {
    let m = Mosquitto::start();
    let a = agent("dev-nd", m.port, "");
    let obs = Observer::connect(m.port, &["debfleet/device/dev-nd/status"]);
    online(&obs, "dev-nd");
    // Without TCP_NODELAY, each of a command's back-to-back records (accepted, running,
    // succeeded) waits for the broker's delayed ACK of the one before.
    let nodelay = wait_for(T, "the agent's socket to the broker", || nodelay_of_socket_to(a.pid(), m.port));
    assert!(nodelay, "TCP_NODELAY is off on the agent's connection");
}
