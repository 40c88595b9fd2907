//! An agent-driven install of a small package against plain `apt-get install` of the same
//! package on the same device, alternating, several rounds; prints the medians and the ratio
//! (goal: at most 1.15x). Needs root, the lab packages and target/debs (bench/agent-install.sh).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use debfleet_tests::lab::Device;
use debfleet_tests::repo::{build_deb, RepoServer};
use debfleet_tests::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn own_deb(name: &str) -> PathBuf {
    let dir = bin("debfleet").parent().unwrap().parent().unwrap().join("debs");
    std::fs::read_dir(&dir)
        .expect("target/debs: run scripts/build-debs.sh")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{name}_")))
        .expect("agent .deb")
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(7);
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/bench-1/status"]);
    let repo = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    assert!(repo.publish(&build_deb(work.path(), "df-bench", "1.0", "all", "", false), "stable").status.success());
    let dev = Device::boot("bench-1");
    dev.put(&own_deb("debfleet-agent"), "/var/tmp/agent.deb");
    dev.ok(&["dpkg", "-i", "/var/tmp/agent.deb"]);
    dev.write("/etc/debfleet/agent.toml", &format!("broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\n", m.url()));
    dev.put(&repo.root.join("public/debfleet-archive-keyring.gpg"), "/etc/apt/keyrings/debfleet.gpg");
    dev.write(
        "/etc/apt/sources.list.d/debfleet.list",
        &format!("deb [signed-by=/etc/apt/keyrings/debfleet.gpg] {}/ stable main\n", repo.url()),
    );
    let _ = std::fs::remove_file(dev.root.join("etc/apt/sources.list.d/debian.sources"));
    dev.ok(&["apt-get", "update"]);
    dev.ok(&["systemctl", "restart", "debfleet-agent"]);
    obs.wait("debfleet/device/bench-1/status", Duration::from_secs(30), |v| v["state"] == "online");

    let reset = || {
        dev.ok(&["apt-get", "purge", "-y", "df-bench"]);
        dev.ok(&["apt-get", "clean"]);
    };
    let (mut agent, mut plain, mut inside) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut run_agent = || {
            let t = Instant::now();
            let out = Command::new(bin("debfleet"))
                .args(["install", "bench-1", "df-bench", "--watch", "0", "--json"])
                .env("DEBFLEET_BROKER", m.url())
                .output()
                .unwrap();
            let wall = t.elapsed().as_secs_f64();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            agent.push(wall);
            inside.push(v[0]["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0);
            reset();
        };
        let mut run_plain = || {
            let t = Instant::now();
            dev.ok(&["apt-get", "install", "-y", "df-bench"]);
            plain.push(t.elapsed().as_secs_f64());
            reset();
        };
        // Alternate which goes first, so drift on a shared machine hits both alike.
        if round % 2 == 0 {
            run_agent();
            run_plain();
        } else {
            run_plain();
            run_agent();
        }
    }
    let (a, p, i) = (median(agent), median(plain), median(inside));
    println!("install of a small package on a systemd-nspawn device, medians of {rounds} alternating rounds");
    println!("{:<58} {:>8.3} s", "plain apt-get install (nsenter, on the device)", p);
    println!("{:<58} {:>8.3} s", "debfleet install (console: publish to final result)", a);
    println!("{:<58} {:>8.3} s", "  of which the agent's own operation (duration_ms)", i);
    println!("ratio debfleet / apt-get: {:.3}x (goal <= 1.15x); agent-internal / apt-get: {:.3}x", a / p, i / p);
}
