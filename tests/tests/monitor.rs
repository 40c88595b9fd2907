//! `debfleet monitor` (issue 17) in a real terminal: tmux runs it against a real Mosquitto and
//! real agents, and the test reads the screen (`capture-pane`) and types keys (`send-keys`).

use std::process::{Command, Stdio};
use std::time::Duration;

use debfleet_tests::*;

/// A tmux session of its own (its own server socket), killed on drop.
struct Tmux {
    socket: String,
    _dir: tempfile::TempDir,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tmux.sock").display().to_string();
        let ok = Command::new("tmux")
            .args(["-S", &socket, "new-session", "-d", "-s", "m", "-x", "170", "-y", "48", command])
            .env("TERM", "xterm-256color")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "tmux (Debian's tmux) starts");
        Tmux { socket, _dir: dir }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux").args(["-S", &self.socket, "capture-pane", "-p", "-t", "m"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut a = vec!["-S", &self.socket, "send-keys", "-t", "m"];
        a.extend_from_slice(keys);
        assert!(Command::new("tmux").args(&a).status().unwrap().success());
    }

    /// Waits until the screen shows what `f` looks for.
    fn wait(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            last = self.screen();
            if f(&last) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the monitor never showed {what}:\n{last}");
    }

    fn alive(&self) -> bool {
        Command::new("tmux").args(["-S", &self.socket, "has-session", "-t", "m"]).status().is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-S", &self.socket, "kill-server"]).status();
    }
}

#[test]
fn the_monitor_follows_the_fleet_in_a_terminal() {
    let m = Mosquitto::start();
    let a1 = Agent::start(AgentSpec { id: "mo-1", port: m.port, groups: &["alpha"], extra: "" });
    let _a2 = Agent::start(AgentSpec { id: "mo-2", port: m.port, groups: &["beta"], extra: "" });
    let cache = tempfile::tempdir().unwrap();
    let t = Tmux::start(&format!(
        "env XDG_CACHE_HOME={} DEBFLEET_BROKER={} {} monitor",
        cache.path().display(),
        m.url(),
        bin("debfleet").display()
    ));
    // Both devices, online; up selects the first.
    let s = t.wait("both devices online", |s| s.contains("Devices 2/2 online · group all") && s.contains("mo-2"));
    assert!(s.contains("alpha") && s.contains("beta"), "{s}");
    t.keys(&["Up"]);
    let s = t.wait("mo-1 selected", |s| s.contains("> mo-1"));
    assert!(s.contains("/s debfleet/device/+/status") || s.contains("/s debfleet/device/+/meta"), "{s}");

    // A component on mo-1, and an operation: the right-hand panels.
    let dir = tempfile::tempdir().unwrap();
    let strip = Command::new(bin("debfleet-led-strip"))
        .env("DEBFLEET_SOCKET", a1.socket())
        .env("STATE_DIRECTORY", dir.path().join("state"))
        .env("RUNTIME_DIRECTORY", dir.path().join("run"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed however the test ends (it would otherwise reconnect to a dead socket forever).
    let _strip = Killed(strip);
    t.wait("the LED strip", |s| s.contains("Components of mo-1") && s.contains("led-strip") && s.contains("idle"));
    let (code, _, text) = console_result(&m.url(), &["component", "call", "mo-1", "led-strip", "rainbow-cycle"]);
    assert_eq!(code, Some(0), "{text}");
    t.wait("the effect's state", |s| s.contains("effect=rainbow-cycle") && s.contains("running"));
    t.wait("the call, succeeded", |s| s.contains("call succeeded"));

    // Logs: mo-1's agent at debug level, in batches each second.
    let (code, _, text) = console_result(&m.url(), &["cfg", "set", "mo-1", "logs.level=debug", "logs.batch_s=1"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, _, text) = console_result(&m.url(), &["ping", "mo-1"]);
    assert_eq!(code, Some(0), "{text}");
    t.wait("mo-1's log lines", |s| s.lines().any(|l| l.contains(" mo-1 ") && l.contains("debug")));
    t.wait("the logs' rate", |s| s.contains("/s debfleet/device/+/logs"));

    // Keys: down selects mo-2 (no components); g filters by group; q quits.
    t.keys(&["Down"]);
    t.wait("mo-2 selected", |s| s.contains("> mo-2") && s.contains("Components of mo-2"));
    t.keys(&["g"]);
    let s = t.wait("group alpha", |s| s.contains("Devices 1/1 online · group alpha"));
    assert!(!s.contains("  mo-2 "), "{s}");
    assert!(s.contains("> mo-1"), "the selection follows the filter: {s}");
    t.keys(&["g"]);
    t.wait("group beta", |s| s.contains("group beta") && s.contains("> mo-2"));
    t.keys(&["g"]);
    t.wait("all again", |s| s.contains("Devices 2/2 online · group all"));
    // A device that goes away shows so.
    drop(_a2);
    t.wait("mo-2 not online", |s| s.contains("Devices 1/2 online"));
    t.keys(&["q"]);
    wait_for(Duration::from_secs(10), "the monitor to quit", || (!t.alive()).then_some(()));
}
