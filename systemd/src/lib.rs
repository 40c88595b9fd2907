//! systemd's manager over D-Bus (zbus): start, stop, restart and reload units and wait for the
//! job's own result (`JobRemoved`, which systemd only sends after `Subscribe`), enable and disable
//! unit files, read and watch units' state through `PropertiesChanged` (no polling), and tell a
//! crash loop from a single failure.

mod crashloop;
mod proxies;

use std::time::Duration;

use futures_util::stream::{select_all, BoxStream, StreamExt};
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

pub use crashloop::CrashLoop;
use proxies::{ManagerProxy, ServiceProxy, UnitProxy};

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{0:?} is not a systemd unit name")]
    InvalidUnit(String),
    #[error("unit {unit}: the {action} job ended {result:?} (unit now {active_state})")]
    JobFailed { unit: String, action: &'static str, result: String, active_state: ActiveState },
    #[error("unit {0} does not exist")]
    NoSuchUnit(String),
    #[error("unit {unit}: no job result within {timeout:?}")]
    Timeout { unit: String, timeout: Duration },
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Reload,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
            Action::Reload => "reload",
        }
    }
}

/// What the agent reports about a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub name: String,
    pub load_state: String,
    pub active_state: ActiveState,
    pub sub_state: String,
    /// `enabled`, `disabled`, `static`, ... (empty for units without a file).
    pub unit_file_state: String,
    /// Automatic restarts so far (services only).
    pub n_restarts: Option<u32>,
    /// When the active state last changed, microseconds since the epoch.
    pub since_us: u64,
}

impl UnitState {
    pub fn is_failed(&self) -> bool {
        self.active_state == ActiveState::Failed
    }
}

pub use debfleet_protocol::units::{valid_unit_name, ActiveState};

fn check(unit: &str) -> Result<(), SystemdError> {
    if valid_unit_name(unit) {
        Ok(())
    } else {
        Err(SystemdError::InvalidUnit(unit.to_owned()))
    }
}

pub struct Systemd {
    conn: Connection,
    manager: ManagerProxy<'static>,
}

impl Systemd {
    /// The machine's system bus.
    pub async fn system() -> Result<Systemd, SystemdError> {
        Self::with(Connection::system().await?).await
    }

    /// A bus at an address (`unix:path=...`), e.g. a container's.
    pub async fn at(address: &str) -> Result<Systemd, SystemdError> {
        let conn = zbus::connection::Builder::address(address)?.build().await?;
        Self::with(conn).await
    }

    async fn with(conn: Connection) -> Result<Systemd, SystemdError> {
        let manager = ManagerProxy::new(&conn).await?;
        // Without this systemd sends neither JobRemoved nor unit PropertiesChanged.
        manager.subscribe().await?;
        Ok(Systemd { conn, manager })
    }

    async fn unit_path(&self, unit: &str) -> Result<OwnedObjectPath, SystemdError> {
        Ok(self.manager.load_unit(unit).await?)
    }

    async fn unit_proxy(&self, unit: &str) -> Result<UnitProxy<'static>, SystemdError> {
        let path = self.unit_path(unit).await?;
        Ok(UnitProxy::builder(&self.conn).path(path)?.build().await?)
    }

    /// The unit's current state.
    pub async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        check(unit)?;
        let path = self.unit_path(unit).await?;
        self.state_at(unit, &path).await
    }

    async fn state_at(&self, unit: &str, path: &OwnedObjectPath) -> Result<UnitState, SystemdError> {
        let u = UnitProxy::builder(&self.conn).path(path.clone())?.build().await?;
        let n_restarts = if unit.ends_with(".service") {
            let s = ServiceProxy::builder(&self.conn).path(path.clone())?.build().await?;
            s.n_restarts().await.ok()
        } else {
            None
        };
        Ok(UnitState {
            name: unit.to_owned(),
            load_state: u.load_state().await?,
            active_state: ActiveState::parse(&u.active_state().await?),
            sub_state: u.sub_state().await?,
            unit_file_state: u.unit_file_state().await.unwrap_or_default(),
            n_restarts,
            since_us: u.state_change_timestamp().await.unwrap_or(0),
        })
    }

    /// Runs a job on the unit and waits for its result; then returns the unit's state. A job
    /// that ends other than `done` is an error carrying systemd's result word.
    pub async fn act(&self, unit: &str, action: Action, timeout: Duration) -> Result<UnitState, SystemdError> {
        check(unit)?;
        if action != Action::Stop {
            let state = self.state(unit).await?;
            if state.load_state == "not-found" {
                return Err(SystemdError::NoSuchUnit(unit.to_owned()));
            }
        }
        // Listen before asking, so the job cannot finish unseen.
        let mut removed = self.manager.receive_job_removed().await?;
        let job = match action {
            Action::Start => self.manager.start_unit(unit, "replace").await?,
            Action::Stop => self.manager.stop_unit(unit, "replace").await?,
            Action::Restart => self.manager.restart_unit(unit, "replace").await?,
            Action::Reload => self.manager.reload_unit(unit, "replace").await?,
        };
        let result = tokio::time::timeout(timeout, async {
            while let Some(signal) = removed.next().await {
                let args = signal.args()?;
                if args.job() == &*job {
                    return Ok::<String, zbus::Error>(args.result().to_string());
                }
            }
            Err(zbus::Error::Failure("the bus closed".into()))
        })
        .await
        .map_err(|_| SystemdError::Timeout { unit: unit.to_owned(), timeout })??;
        let state = self.state(unit).await?;
        if result != "done" {
            return Err(SystemdError::JobFailed {
                unit: unit.to_owned(),
                action: action.as_str(),
                result,
                active_state: state.active_state,
            });
        }
        Ok(state)
    }

    pub async fn enable(&self, units: &[&str]) -> Result<(), SystemdError> {
        units.iter().try_for_each(|u| check(u))?;
        self.manager.enable_unit_files(units, false, true).await?;
        self.manager.reload().await?;
        Ok(())
    }

    pub async fn disable(&self, units: &[&str]) -> Result<(), SystemdError> {
        units.iter().try_for_each(|u| check(u))?;
        self.manager.disable_unit_files(units, false).await?;
        self.manager.reload().await?;
        Ok(())
    }

    /// Starts a command as its own transient oneshot service (`systemd-run` without the tool):
    /// it runs outside the caller's service, so it survives the caller being restarted — how
    /// the agent upgrades its own package. The unit stays loaded after it ends, with its result,
    /// until [`Systemd::forget`].
    pub async fn start_transient(&self, unit: &str, description: &str, argv: &[String]) -> Result<(), SystemdError> {
        check(unit)?;
        let Some(program) = argv.first() else {
            return Err(SystemdError::InvalidUnit(format!("{unit}: empty command")));
        };
        use zbus::zvariant::Value;
        let exec: Vec<(String, Vec<String>, bool)> = vec![(program.clone(), argv.to_vec(), false)];
        let env: Vec<String> = vec!["DEBIAN_FRONTEND=noninteractive".into(), "LC_ALL=C.UTF-8".into()];
        let props: Vec<(&str, Value<'_>)> = vec![
            ("Description", Value::from(description)),
            ("Type", Value::from("oneshot")),
            ("RemainAfterExit", Value::from(true)),
            ("Environment", Value::from(env)),
            ("ExecStart", Value::from(exec)),
        ];
        self.manager.start_transient_unit(unit, "fail", &props, &[]).await?;
        Ok(())
    }

    /// A oneshot service's outcome once it has run: `Some("success")`, `Some("exit-code")`, ...;
    /// `None` while it still runs.
    pub async fn oneshot_result(&self, unit: &str) -> Result<Option<(String, i32)>, SystemdError> {
        check(unit)?;
        let path = self.unit_path(unit).await?;
        let state = self.state_at(unit, &path).await?;
        if state.active_state.is_changing() {
            return Ok(None);
        }
        if state.load_state == "not-found" {
            return Err(SystemdError::NoSuchUnit(unit.to_owned()));
        }
        let s = ServiceProxy::builder(&self.conn).path(path)?.build().await?;
        Ok(Some((s.result().await?, s.exec_main_status().await.unwrap_or(0))))
    }

    /// Stops and unloads a finished transient unit.
    pub async fn forget(&self, unit: &str) -> Result<(), SystemdError> {
        check(unit)?;
        let _ = self.manager.stop_unit(unit, "replace").await;
        let _ = self.manager.reset_failed_unit(unit).await;
        Ok(())
    }

    /// Re-reads unit files (`systemctl daemon-reload`).
    pub async fn reload_daemon(&self) -> Result<(), SystemdError> {
        Ok(self.manager.reload().await?)
    }

    /// A stream of the units' states: the current one for each, then one whenever systemd
    /// reports a change of a unit's active or sub state.
    pub async fn watch(&self, units: &[String]) -> Result<BoxStream<'static, UnitState>, SystemdError> {
        let mut streams: Vec<BoxStream<'static, UnitState>> = Vec::new();
        for unit in units {
            check(unit)?;
            let proxy = self.unit_proxy(unit).await?;
            let path = self.unit_path(unit).await?;
            let first = self.state_at(unit, &path).await?;
            let changes = proxy.receive_sub_state_changed().await;
            let conn = self.conn.clone();
            let name = unit.clone();
            let updates = changes.then(move |_| {
                let (conn, name, path) = (conn.clone(), name.clone(), path.clone());
                async move {
                    let me = Systemd { manager: ManagerProxy::new(&conn).await.ok()?, conn };
                    me.state_at(&name, &path).await.ok()
                }
            });
            let stream =
                futures_util::stream::once(async move { first }).chain(updates.filter_map(|s| async move { s }));
            streams.push(stream.boxed());
        }
        Ok(select_all(streams).boxed())
    }
}
