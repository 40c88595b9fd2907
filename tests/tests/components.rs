//! Components end to end (issue 13): the LED strip (virtual output) through a real agent and
//! Mosquitto — calls from the console, its state, frames and configuration, hostile arguments and
//! a hostile socket client; then on a lab device from our repository: installed through the
//! console, killed and restarted by systemd, upgraded, rolled back and removed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use debfleet_protocol::component::{decode, encode, frame_len, ComponentMeta, Down, Up};
use debfleet_tests::lab::Device;
use debfleet_tests::repo::RepoServer;
use debfleet_tests::*;
use serde_json::{json, Value};

fn console(m: &Mosquitto, args: &[&str]) -> (Option<i32>, Value, String) {
    console_result(&m.url(), args)
}

/// The LED strip as a process of its own beside a host agent.
fn led_strip(socket: &Path, dir: &Path) -> Child {
    Command::new(bin("debfleet-led-strip"))
        .env("DEBFLEET_SOCKET", socket)
        .env("STATE_DIRECTORY", dir.join("state"))
        .env("RUNTIME_DIRECTORY", dir.join("run"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A command published as a sender would, and its final record.
fn raw_call(obs: &Observer, dev: &str, id: &str, body: Value) -> Value {
    let mut body = body;
    body["id"] = json!(id);
    obs.publish(&format!("debfleet/device/{dev}/cmd/call"), serde_json::to_vec(&body).unwrap(), false);
    obs.wait(&format!("debfleet/device/{dev}/op/{id}"), Duration::from_secs(20), |v| {
        ["succeeded", "failed"].contains(&v["state"].as_str().unwrap_or(""))
    })
}

fn hostile_client(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_down(s: &mut UnixStream) -> Option<Down> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let mut body = vec![0; frame_len(h).ok()?];
    s.read_exact(&mut body).ok()?;
    decode(&body).ok()
}

/// The connection ends (the agent closed it): reads see EOF or an error.
fn closed(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    for _ in 0..100 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
    false
}

#[test]
fn a_component_through_the_agent_and_what_hostile_input_gets() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let agent = Agent::start(AgentSpec { id: "cm-1", port: m.port, groups: &["lab"], extra: "" });
    obs.wait("debfleet/device/cm-1/status", Duration::from_secs(20), |v| v["state"] == "online");
    let dir = tempfile::tempdir().unwrap();
    let mut strip = led_strip(&agent.socket(), dir.path());

    // It says hello; the agent publishes its meta and lists it (no package: started by hand).
    let meta = obs.wait("debfleet/device/cm-1/components/led-strip/meta", Duration::from_secs(20), |_| true);
    assert!(meta["actions"].as_array().unwrap().iter().any(|a| a["name"] == "rainbow-cycle"), "{meta}");
    obs.wait("debfleet/device/cm-1/state/components", Duration::from_secs(20), |v| {
        v["components"]["led-strip"]["state"] == "idle"
    });
    obs.wait("debfleet/device/cm-1/components/led-strip/cfg", Duration::from_secs(20), |v| v["cfg"]["leds"] == 60);

    // An effect from the console; its state and a frame.
    let (code, v, text) =
        console(&m, &["component", "call", "cm-1", "led-strip", "rainbow-cycle", "wait_ms=20", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["effect"], "rainbow-cycle", "{text}");
    obs.wait("debfleet/device/cm-1/components/led-strip/state", Duration::from_secs(10), |v| {
        v["state"]["effect"] == "rainbow-cycle" && v["state"]["params"]["wait_ms"] == 20
    });
    obs.wait("debfleet/device/cm-1/components/led-strip/status", Duration::from_secs(10), |v| v["state"] == "running");
    let (code, v, text) = console(&m, &["component", "call", "cm-1", "led-strip", "frames", "count=2", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let frames = v[0]["result"]["frames"].as_array().unwrap().clone();
    assert_eq!(frames.len(), 2, "{text}");
    assert_eq!(frames[1].as_str().unwrap().len(), 60 * 6);
    assert_ne!(frames[1].as_str().unwrap(), "000000".repeat(60), "the strip is lit");

    // Brightness by cfg: the state says so, and the next frames are dimmer.
    let (code, v, text) = console(&m, &["component", "cfg", "cm-1", "led-strip", "brightness=10", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["brightness"], 10, "{text}");
    obs.wait("debfleet/device/cm-1/components/led-strip/state", Duration::from_secs(10), |v| {
        v["state"]["brightness"] == 10
    });
    let (_, v, _) = console(&m, &["component", "call", "cm-1", "led-strip", "frames", "--json"]);
    let frame = v[0]["result"]["frames"][0].as_str().unwrap().to_owned();
    let max = (0..frame.len()).step_by(2).map(|i| u8::from_str_radix(&frame[i..i + 2], 16).unwrap()).max().unwrap();
    assert!(max <= 26, "at 10 % no channel is above 26: {max}");

    // The console refuses what the meta says cannot work, before sending anything.
    let (code, _, text) = console(&m, &["component", "call", "cm-1", "led-strip", "dance"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("no action dance"), "{text}");
    // The device refuses the rest, with codes, and the effect plays on.
    for (id, body, code, says) in [
        ("h1", json!({"component": "led-strip", "action": "dance"}), "unknown_action", "no action"),
        (
            "h2",
            json!({"component": "led-strip", "action": "set-color", "args": {"color": "#zzzzzz"}}),
            "invalid_value",
            "colour",
        ),
        (
            "h3",
            json!({"component": "led-strip", "action": "set-color", "args": {"color": [255, 0, 256]}}),
            "invalid_value",
            "colour",
        ),
        (
            "h4",
            json!({"component": "led-strip", "action": "set-range", "args": {"color": "#ff0000", "from": 0, "to": 5000, "unit": "index"}}),
            "invalid_value",
            "past the strip's end",
        ),
        (
            "h5",
            json!({"component": "led-strip", "action": "brightness", "args": {"level": "high"}}),
            "invalid_value",
            "got a string",
        ),
        (
            "h6",
            json!({"component": "led-strip", "action": "rainbow", "args": {"wait_ms": -1}}),
            "invalid_value",
            "outside",
        ),
        (
            "h7",
            json!({"component": "led-strip", "action": "glow", "args": {"colour": "#ffffff"}}),
            "invalid_value",
            "unknown argument",
        ),
        ("h8", json!({"component": "nope", "action": "clear"}), "component_unavailable", "no component nope"),
        ("h9", json!({"component": "../led-strip", "action": "clear"}), "invalid_value", "component id"),
        (
            "h10",
            json!({"component": "led-strip", "action": "frames", "args": {"count": 1000000}}),
            "invalid_value",
            "outside",
        ),
    ] {
        let rec = raw_call(&obs, "cm-1", id, body);
        assert_eq!(rec["state"], "failed", "{id}: {rec}");
        assert_eq!(rec["error"]["code"], code, "{id}: {rec}");
        assert!(rec["error"]["message"].as_str().unwrap().contains(says), "{id}: {rec}");
    }
    let (_, v, _) = console(&m, &["component", "call", "cm-1", "led-strip", "state", "--json"]);
    assert_eq!(v[0]["result"]["effect"], "rainbow-cycle", "the running effect was left alone: {v}");

    // Hostile socket clients: each one's connection ends; the agent and the strip carry on.
    let mut c = hostile_client(&agent.socket());
    c.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(closed(&mut c), "an oversized frame header ends the connection");
    let mut c = hostile_client(&agent.socket());
    c.write_all(&[0, 0, 0, 5, b'{', b'x', b'y', b'z', b'}']).unwrap();
    assert!(closed(&mut c), "a frame that is not JSON ends the connection");
    let mut c = hostile_client(&agent.socket());
    c.write_all(&encode(&Up::State { state: Default::default() }).unwrap()).unwrap();
    assert!(matches!(read_down(&mut c), Some(Down::Bye { .. })), "a frame before the hello");
    assert!(closed(&mut c));
    let impostor: ComponentMeta = serde_json::from_value(meta.clone()).unwrap();
    let mut c = hostile_client(&agent.socket());
    c.write_all(&encode(&Up::Hello { meta: impostor.clone() }).unwrap()).unwrap();
    match read_down(&mut c) {
        Some(Down::Bye { reason }) => assert!(reason.contains("already connected"), "{reason}"),
        other => panic!("a second led-strip: {other:?}"),
    }
    // A flood from a component of its own is cut off.
    let mut flood_meta = impostor;
    flood_meta.component = "flood".parse().unwrap();
    let mut c = hostile_client(&agent.socket());
    c.write_all(&encode(&Up::Hello { meta: flood_meta }).unwrap()).unwrap();
    assert!(matches!(read_down(&mut c), Some(Down::Welcome { .. })));
    let state = encode(&Up::State { state: json!({"n": 1}).as_object().unwrap().clone() }).unwrap();
    let mut cut = false;
    for _ in 0..5000 {
        if c.write_all(&state).is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut || closed(&mut c), "a flood of frames is cut off");
    let (code, _, text) = console(&m, &["ping", "cm-1"]);
    assert_eq!(code, Some(0), "the agent answers after all that: {text}");
    wait_for(Duration::from_secs(10), "the agent's word on the flood", || {
        agent.log().contains("cut off").then_some(())
    });

    // The strip's process dies: stopped; a new one is a restart.
    strip.kill().unwrap();
    strip.wait().unwrap();
    obs.wait("debfleet/device/cm-1/components/led-strip/status", Duration::from_secs(10), |v| v["state"] == "stopped");
    let rec = raw_call(&obs, "cm-1", "gone-1", json!({"component": "led-strip", "action": "clear"}));
    assert_eq!(rec["error"]["code"], "component_unavailable", "{rec}");
    let mut strip = led_strip(&agent.socket(), dir.path());
    obs.wait("debfleet/device/cm-1/state/components", Duration::from_secs(20), |v| {
        v["components"]["led-strip"]["restarts"] == 1
    });
    // Its configuration was kept across the restart.
    obs.wait("debfleet/device/cm-1/components/led-strip/cfg", Duration::from_secs(10), |v| {
        v["cfg"]["brightness"] == 10
    });
    let (code, _, text) = console(&m, &["component", "list", "cm-1"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("led-strip") && text.contains("RESTARTS"), "{text}");
    strip.kill().unwrap();
    strip.wait().unwrap();
}

#[test]
fn installed_from_the_repository_restarted_upgraded_rolled_back_and_removed() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let repo = RepoServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let first = own_deb("debfleet-led-strip");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../components/led-strip/package/manifest.toml");
    let out = Command::new(bin("debfleet"))
        .args(["package"])
        .arg(&manifest)
        .args(["--version", "0.1.1", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(repo.publish(&first, "stable").status.success());
    assert!(repo.publish(&second, "stable").status.success());

    let dev = Device::boot("cm-2");
    let config = format!("broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\n\n[apt]\nwatch_s = 3\n", m.url());
    dev.install_agent(&config, &repo);
    obs.wait("debfleet/device/cm-2/status", Duration::from_secs(30), |v| v["state"] == "online");

    let (code, v, text) = console(&m, &["install", "cm-2", "debfleet-led-strip=0.1.0", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["state"], "succeeded", "{text}");
    obs.wait("debfleet/device/cm-2/state/components", Duration::from_secs(30), |v| {
        let e = &v["components"]["led-strip"];
        e["package"] == "debfleet-led-strip"
            && e["version"] == "0.1.0"
            && e["state"] == "idle"
            && e["unit"] == "debfleet-led-strip.service"
    });
    let (code, v, text) =
        console(&m, &["component", "call", "cm-2", "led-strip", "set-color", "color=#00ff00", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["mode"], "still");
    let (_, v, _) = console(&m, &["component", "call", "cm-2", "led-strip", "frames", "--json"]);
    assert_eq!(v[0]["result"]["frames"][0], "00ff00".repeat(60));
    // It runs as its own unprivileged user, in the debfleet group.
    let status = dev.ok(&["sh", "-c", "grep -E '^(Uid|Groups):' /proc/$(pidof debfleet-led-strip)/status"]);
    assert!(!status.lines().next().unwrap().split_whitespace().nth(1).unwrap().starts_with('0'), "{status}");

    // Killed: systemd starts it again, the agent counts the restart, its picture comes back
    // dark (a still picture is not configuration) but its configuration is kept.
    let (code, _, text) = console(&m, &["component", "cfg", "cm-2", "led-strip", "brightness=50"]);
    assert_eq!(code, Some(0), "{text}");
    dev.ok(&["systemctl", "kill", "--signal=KILL", "debfleet-led-strip"]);
    obs.wait("debfleet/device/cm-2/state/components", Duration::from_secs(30), |v| {
        v["components"]["led-strip"]["restarts"] == 1 && v["components"]["led-strip"]["state"] == "idle"
    });
    obs.wait("debfleet/device/cm-2/components/led-strip/cfg", Duration::from_secs(10), |v| {
        v["cfg"]["brightness"] == 50
    });

    let (code, _, text) = console(&m, &["upgrade", "cm-2", "debfleet-led-strip", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    obs.wait("debfleet/device/cm-2/state/components", Duration::from_secs(30), |v| {
        v["components"]["led-strip"]["version"] == "0.1.1"
    });
    let (code, _, text) = console(&m, &["rollback", "cm-2", "debfleet-led-strip", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    obs.wait("debfleet/device/cm-2/state/components", Duration::from_secs(30), |v| {
        v["components"]["led-strip"]["version"] == "0.1.0" && v["components"]["led-strip"]["state"] == "idle"
    });
    let (code, v, text) =
        console(&m, &["component", "call", "cm-2", "led-strip", "theater-chase", "color=#ff0000", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["effect"], "theater-chase");
    // Hostile arguments on the device: error codes, and the effect plays on.
    for (id, body, code) in [
        ("cm2-h1", json!({"component": "led-strip", "action": "fireworks"}), "unknown_action"),
        (
            "cm2-h2",
            json!({"component": "led-strip", "action": "set-color", "args": {"color": [300, 0, 0]}}),
            "invalid_value",
        ),
        (
            "cm2-h3",
            json!({"component": "led-strip", "action": "set-range", "args": {"color": "#ffffff", "to": 99999, "unit": "index"}}),
            "invalid_value",
        ),
        ("cm2-h4", json!({"component": "led-strip", "action": "running", "args": {"width": "wide"}}), "invalid_value"),
    ] {
        let rec = raw_call(&obs, "cm-2", id, body);
        assert_eq!(rec["error"]["code"], code, "{id}: {rec}");
    }
    let (_, v, _) = console(&m, &["component", "call", "cm-2", "led-strip", "state", "--json"]);
    assert_eq!(v[0]["result"]["effect"], "theater-chase", "{v}");

    let (code, _, text) = console(&m, &["uninstall", "cm-2", "debfleet-led-strip", "--purge", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    // Nothing left running, and the broker forgets it.
    assert!(!dev.exec(&["pidof", "debfleet-led-strip"]).status.success(), "nothing left running");
    wait_for(Duration::from_secs(20), "state/components cleared", || {
        obs.last("debfleet/device/cm-2/state/components").filter(|m| m.payload.is_empty()).map(|_| ())
    });
    wait_for(Duration::from_secs(20), "the component's facts cleared", || {
        obs.last("debfleet/device/cm-2/components/led-strip/meta").filter(|m| m.payload.is_empty()).map(|_| ())
    });
    let rec = raw_call(&obs, "cm-2", "after-1", json!({"component": "led-strip", "action": "clear"}));
    assert_eq!(rec["error"]["code"], "component_unavailable", "{rec}");
}

#[test]
fn the_projector_from_the_repository_against_a_simulated_projector_unplugged_and_back() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let repo = RepoServer::start(&[]);
    assert!(repo.publish(&own_deb("debfleet-projector"), "stable").status.success());
    let dev = Device::boot("cm-3");
    let config = format!("broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\n\n[apt]\nwatch_s = 3\n", m.url());
    dev.install_agent(&config, &repo);
    obs.wait("debfleet/device/cm-3/status", Duration::from_secs(30), |v| v["state"] == "online");

    let (code, _, text) = console(&m, &["install", "cm-3", "debfleet-projector", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    // No projector on its default port: it runs, says why it cannot work, and calls say so too.
    obs.wait("debfleet/device/cm-3/components/projector/status", Duration::from_secs(30), |v| {
        v["state"] == "error" && v["message"].as_str().unwrap_or("").contains("/dev/ttyUSB0")
    });
    let rec =
        raw_call(&obs, "cm-3", "pj-1", json!({"component": "projector", "action": "power", "args": {"on": true}}));
    assert_eq!(rec["error"]["code"], "component_unavailable", "{rec}");

    // A simulated projector on a pseudo-terminal in the device (a drop-in allows ptys), and the
    // component pointed at it through its configuration.
    dev.ok(&[
        "systemd-run",
        "--unit=projector-sim",
        "/usr/bin/debfleet-projector",
        "--simulate",
        "/run/projector-sim.tty",
    ]);
    dev.ok(&["mkdir", "-p", "/etc/systemd/system/debfleet-projector.service.d"]);
    dev.write("/etc/systemd/system/debfleet-projector.service.d/pty.conf", "[Service]\nDeviceAllow=char-pts rw\n");
    dev.ok(&["systemctl", "daemon-reload"]);
    dev.ok(&["systemctl", "restart", "debfleet-projector"]);
    let (code, _, text) = console(&m, &["component", "cfg", "cm-3", "projector", "port=/run/projector-sim.tty"]);
    assert_eq!(code, Some(0), "{text}");
    obs.wait("debfleet/device/cm-3/components/projector/state", Duration::from_secs(20), |v| {
        v["state"]["connection"] == "connected" && v["state"]["power"] == "off"
    });
    let (code, v, text) = console(&m, &["component", "call", "cm-3", "projector", "power", "on=true", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["power"], "on", "{text}");
    let (code, _, text) = console(&m, &["component", "call", "cm-3", "projector", "input", "source=hdmi2"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, _, text) = console(&m, &["component", "call", "cm-3", "projector", "input", "source=scart"]);
    assert_eq!(code, Some(2), "the console names a source the projector does not have: {text}");

    // Unplugged (the simulator stops): disconnected; plugged in again: connected, and asked.
    dev.ok(&["systemctl", "stop", "projector-sim"]);
    obs.wait("debfleet/device/cm-3/components/projector/state", Duration::from_secs(20), |v| {
        v["state"]["connection"] == "disconnected"
    });
    let rec =
        raw_call(&obs, "cm-3", "pj-2", json!({"component": "projector", "action": "power", "args": {"on": false}}));
    assert_eq!(rec["error"]["code"], "component_unavailable", "{rec}");
    dev.ok(&[
        "systemd-run",
        "--unit=projector-sim2",
        "/usr/bin/debfleet-projector",
        "--simulate",
        "/run/projector-sim.tty",
    ]);
    let since = obs.messages().len();
    wait_for(Duration::from_secs(20), "the projector back", || {
        obs.messages()[since..]
            .iter()
            .any(|m| {
                m.topic == "debfleet/device/cm-3/components/projector/state"
                    && m.json()["state"]["connection"] == "connected"
            })
            .then_some(())
    });
    let (code, v, text) = console(&m, &["component", "call", "cm-3", "projector", "refresh", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["connection"], "connected", "{text}");
}
