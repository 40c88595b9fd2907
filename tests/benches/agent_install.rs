//! An agent-driven install of a one-service package against plain `apt-get install` of the same
//! package on the same device, alternating, several rounds; prints the medians and the ratios:
//! with the agent's default settings (the units verified until they settle) and with
//! `--watch 0` (no verification). Needs root, the lab packages and target/debs
//! (bench/agent-install.sh).

use std::process::Command;
use std::time::{Duration, Instant};

use debfleet_tests::lab::Device;
use debfleet_tests::repo::{service_deb, RepoServer};
use debfleet_tests::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(7);
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/bench-1/status"]);
    let repo = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    assert!(repo.publish(&service_deb(work.path(), "df-bench", "1.0", false), "stable").status.success());
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
    // (wall seconds, the agent's own duration_ms) per debfleet path.
    let mut runs: [(Vec<f64>, Vec<f64>); 2] = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    let mut plain = Vec::new();
    let paths: [(&str, &[&str]); 2] = [("defaults", &[]), ("--watch 0", &["--watch", "0"])];
    for round in 0..rounds {
        let mut run_agent = |i: usize| {
            let t = Instant::now();
            let out = Command::new(bin("debfleet"))
                .args(["install", "bench-1", "df-bench", "--json"])
                .args(paths[i].1)
                .env("DEBFLEET_BROKER", m.url())
                .output()
                .unwrap();
            let wall = t.elapsed().as_secs_f64();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            runs[i].0.push(wall);
            runs[i].1.push(v[0]["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0);
            reset();
        };
        // Alternate the order, so drift on a shared machine hits every path alike.
        let order = [[0, 1, 2], [2, 1, 0], [1, 2, 0]][round % 3];
        for k in order {
            if k == 2 {
                let t = Instant::now();
                dev.ok(&["apt-get", "install", "-y", "df-bench"]);
                plain.push(t.elapsed().as_secs_f64());
                reset();
            } else {
                run_agent(k);
            }
        }
    }
    let p = median(plain);
    println!("install of a one-service package on a systemd-nspawn device, medians of {rounds} rounds");
    println!("{:<62} {:>8.3} s", "plain apt-get install (nsenter, on the device)", p);
    for (i, (name, _)) in paths.iter().enumerate() {
        let (wall, inside) = (median(runs[i].0.clone()), median(runs[i].1.clone()));
        println!(
            "{:<62} {:>8.3} s  {:.3}x",
            format!("debfleet install, {name} (publish to final result)"),
            wall,
            wall / p
        );
        println!("{:<62} {:>8.3} s  {:.3}x", "  of which the agent's own operation (duration_ms)", inside, inside / p);
    }
    println!("goal: --watch 0 <= 1.15x; the defaults add the settle time of the unit check (apt.settle_s)");
}
