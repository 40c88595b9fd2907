//! The systemd crate (issue 5) against a real systemd on a device, over its D-Bus system bus.

use std::time::{Duration, Instant};

use debfleet_systemd::{Action, CrashLoop, Systemd, SystemdError};
use debfleet_tests::lab::Device;
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(30);

async fn bus(dev: &Device) -> Systemd {
    Systemd::at(&format!("unix:path=/proc/{}/root/run/dbus/system_bus_socket", dev.pid)).await.unwrap()
}

fn unit(dev: &Device, name: &str, service: &str) {
    dev.write(
        &format!("/etc/systemd/system/{name}"),
        &format!("[Unit]\nDescription={name}\n\n[Service]\n{service}\n\n[Install]\nWantedBy=multi-user.target\n"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_unit_files_and_watching_on_a_device() {
    let dev = Device::boot("sd-1");
    unit(&dev, "df-sleeper.service", "ExecStart=/bin/sleep infinity");
    unit(&dev, "df-oneshot-fails.service", "Type=oneshot\nExecStart=/bin/false");
    unit(
        &dev,
        "df-crashy.service",
        "ExecStart=/bin/sh -c 'sleep 0.2; exit 3'\nRestart=always\nRestartSec=200ms\nStartLimitIntervalSec=0",
    );
    let sd = bus(&dev).await;
    sd.reload_daemon().await.unwrap();

    // Unit files: enable, disable.
    sd.enable(&["df-sleeper.service"]).await.unwrap();
    assert_eq!(sd.state("df-sleeper.service").await.unwrap().unit_file_state, "enabled");
    // A symlink whose absolute target only resolves inside the device.
    assert!(dev.root.join("etc/systemd/system/multi-user.target.wants/df-sleeper.service").symlink_metadata().is_ok());

    // Jobs, each waited for through JobRemoved, then the unit's state.
    let s = sd.act("df-sleeper.service", Action::Start, T).await.unwrap();
    assert_eq!((s.active_state.as_str(), s.sub_state.as_str()), ("active", "running"));
    let s2 = sd.act("df-sleeper.service", Action::Restart, T).await.unwrap();
    assert_eq!(s2.active_state.as_str(), "active");
    assert!(s2.since_us > s.since_us, "restarted");
    let s3 = sd.act("df-sleeper.service", Action::Stop, T).await.unwrap();
    assert_eq!(s3.active_state.as_str(), "inactive");
    sd.disable(&["df-sleeper.service"]).await.unwrap();
    assert_eq!(sd.state("df-sleeper.service").await.unwrap().unit_file_state, "disabled");

    // A job that fails says so, with systemd's own result word.
    match sd.act("df-oneshot-fails.service", Action::Start, T).await {
        Err(SystemdError::JobFailed { result, active_state, .. }) => {
            assert_eq!((result.as_str(), active_state.as_str()), ("failed", "failed"));
        }
        other => panic!("expected a failed job, got {other:?}"),
    }
    assert!(matches!(sd.act("df-missing.service", Action::Start, T).await, Err(SystemdError::NoSuchUnit(_))));
    assert!(matches!(sd.act("bad name", Action::Start, T).await, Err(SystemdError::InvalidUnit(_))));

    // Watching: a crash-looping service is seen through PropertiesChanged, no polling.
    let mut states = sd.watch(&["df-crashy.service".to_string()]).await.unwrap();
    let first = states.next().await.unwrap();
    assert_eq!(first.active_state.as_str(), "inactive");
    sd.act("df-crashy.service", Action::Start, T).await.unwrap();
    let mut detector = CrashLoop::new(Duration::from_secs(30), 3);
    let started = Instant::now();
    let reason = tokio::time::timeout(T, async {
        while let Some(state) = states.next().await {
            if let Some(reason) = detector.observe(&state, Instant::now()) {
                return reason;
            }
        }
        panic!("watch stream ended");
    })
    .await
    .expect("the crash loop is detected");
    assert!(reason.contains("restarted"), "{reason}");
    assert!(started.elapsed() < T);
    sd.act("df-crashy.service", Action::Stop, T).await.unwrap();
}
