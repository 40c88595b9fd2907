//! `debfleet`: the operator's console.

mod broker;
mod cmds;
mod components;
mod delta;
mod demo;
mod desired;
mod fleet;
mod keys;
mod lab;
mod manual;
mod monitor;
mod output;
mod packages;
mod remote;
mod repo;
mod request;
mod rollout;
mod serve;
mod session;
mod sync;
mod watch;
mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit statuses, documented in the README.
pub mod exit {
    /// A device or operation failed, timed out or was not reachable.
    pub const FAILED: u8 = 1;
    /// Bad usage or invalid input (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// The broker could not be reached or the connection was lost.
    pub const UNREACHABLE: u8 = 3;
    /// The broker refused what this console's broker user may not do (credentials or role).
    pub const REFUSED: u8 = 4;
}

#[derive(Parser)]
#[command(name = "debfleet", version, about = "Control a fleet of Debian devices over MQTT")]
pub(crate) struct Cli {
    /// Broker URL (mqtt://HOST:PORT or mqtts://HOST:PORT) [default: mqtt://127.0.0.1:1883].
    #[arg(long, global = true, env = "DEBFLEET_BROKER")]
    broker: Option<String>,
    /// Repository URL (debfleet-repo serve), for publish, packages, promote and unpublish.
    #[arg(long, global = true, env = "DEBFLEET_REPO")]
    repo: Option<String>,
    /// Publish token.
    #[arg(long, global = true, env = "DEBFLEET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate for an mqtts:// broker.
    #[arg(long, global = true, env = "DEBFLEET_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Broker user name (see `debfleet broker add-user`); the password comes from
    /// --broker-password-file or DEBFLEET_BROKER_PASSWORD.
    #[arg(long, global = true, env = "DEBFLEET_BROKER_USER")]
    broker_user: Option<String>,
    /// File holding the broker user's password (one line).
    #[arg(long, global = true, env = "DEBFLEET_BROKER_PASSWORD_FILE")]
    broker_password_file: Option<PathBuf>,
    /// Sign every command with this operator key (debfleet key generate), for devices that
    /// require signed commands.
    #[arg(long, global = true, env = "DEBFLEET_SIGN_KEY")]
    sign_key: Option<PathBuf>,
    /// Topic prefix.
    #[arg(long, global = true, env = "DEBFLEET_PREFIX", default_value = "debfleet")]
    prefix: String,
    /// Seconds a command stays good for devices that get it late (away, their session kept by
    /// the broker); later they record it as expired instead of running it [default: as long as
    /// the command waits for results, at least 300].
    #[arg(long, global = true, env = "DEBFLEET_EXPIRES", value_name = "SECONDS")]
    expires: Option<u64>,
    /// Who asks: carried in commands (the device keeps it in the operation's record),
    /// desired-state records and rollouts [default: $USER].
    #[arg(long, global = true, env = "DEBFLEET_OPERATOR", value_name = "NAME")]
    by: Option<String>,
    /// Send the publish token over plain http:// to a repository that is not on this machine
    /// (refused without it: anyone on the way could read the token and publish as you).
    #[arg(long, global = true)]
    insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct Targets {
    /// Device ids.
    pub devices: Vec<String>,
    /// Every device in this group (one publish; the broker fans out).
    #[arg(long, conflicts_with_all = ["devices", "all"])]
    pub group: Option<String>,
    /// Every device in the fleet (one publish).
    #[arg(long, conflicts_with_all = ["devices", "group"])]
    pub all: bool,
}

#[derive(Subcommand)]
enum Command {
    /// List every device known from the broker's retained topics.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything known about one device: meta, status, cfg, state, last telemetry, operations.
    Show {
        /// The device's id.
        device: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ping devices and show each one's round trip.
    Ping {
        #[command(flatten)]
        targets: Targets,
        /// Seconds to wait for answers.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A device's unit journal (the managed packages' units and the agent's, or one of them),
    /// read on the device; a group's merged by time.
    Logs(LogsArgs),
    /// A terminal on a device (its agent.toml must allow it: [remote] shell = true), or one
    /// command run there; exits with the remote program's status.
    Shell {
        /// The device's id.
        device: String,
        /// A command to run instead of a login shell (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Forward a local TCP port to HOST:PORT as the device sees it (its agent.toml must list
    /// HOST:PORT in [remote] forward); until Ctrl-C.
    Forward {
        /// The device's id.
        device: String,
        /// LOCAL_PORT:HOST:PORT (local port 0: any free one, printed).
        spec: String,
    },
    /// Read or change a device's runtime configuration.
    Cfg {
        #[command(subcommand)]
        action: CfgAction,
    },
    /// Follow status changes, operations, logs and telemetry live (Ctrl-C stops).
    Watch {
        /// Only this device.
        device: Option<String>,
        /// Only devices of this group.
        #[arg(long, conflicts_with = "device")]
        group: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// A live terminal view of the fleet for debugging: devices, running operations,
    /// components, a merged log and message rates (q quits).
    Monitor {
        /// Start with only this group's devices (g cycles through the groups).
        #[arg(long)]
        group: Option<String>,
    },
    /// List a device's operations, or clear finished ones.
    Ops {
        /// The device's id.
        device: String,
        /// Clear finished operations (all, or those older than --older-than).
        #[arg(long)]
        clear: bool,
        /// With --clear: only those finished at least this many seconds ago.
        #[arg(long, requires = "clear")]
        older_than: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Install a package on devices: `debfleet install lab-1 lab-2 hello=2.0`, `--group G hello`.
    Install {
        #[command(flatten)]
        pkg: PackageArgs,
    },
    /// Upgrade a package (or, with --everything, every managed package) to the newest or a given version.
    Upgrade {
        #[command(flatten)]
        pkg: PackageArgs,
        /// Every managed package.
        #[arg(long)]
        everything: bool,
    },
    /// Remove a package from devices.
    Uninstall {
        #[command(flatten)]
        pkg: PackageArgs,
        /// Also remove its configuration and state.
        #[arg(long)]
        purge: bool,
    },
    /// Go back to the version installed before (or PACKAGE=VERSION).
    Rollback {
        #[command(flatten)]
        pkg: PackageArgs,
    },
    /// A device's components (installed as packages): list, show, call an action, change cfg.
    Component {
        #[command(subcommand)]
        command: components::ComponentCommand,
    },
    /// Desired state: what groups and devices should have installed; devices converge on it,
    /// also when they come back after being away.
    Desired {
        #[command(subcommand)]
        command: desired::DesiredCommand,
    },
    /// Staged rollouts: move a group to new versions in waves that stop themselves on trouble.
    Rollout {
        #[command(subcommand)]
        command: rollout::RolloutCommand,
    },
    /// Restart a managed package's systemd unit on a device.
    Restart {
        /// The device's id.
        device: String,
        /// The unit, e.g. demo-app.service (a managed package's).
        unit: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Upload .deb files into a suite of the repository.
    Publish {
        /// .deb files to upload.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The suite (e.g. stable, testing).
        #[arg(long)]
        suite: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the repository's packages and versions.
    Packages {
        /// The suite (e.g. stable, testing).
        #[arg(long)]
        suite: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Copy NAME=VERSION from one suite to another without re-uploading.
    Promote {
        /// NAME=VERSION.
        package: String,
        /// The suite to copy from.
        #[arg(long)]
        from: String,
        /// The suite to copy to.
        #[arg(long)]
        to: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove NAME=VERSION from a suite.
    Unpublish {
        /// NAME=VERSION.
        package: String,
        /// The suite (e.g. stable, testing).
        #[arg(long)]
        suite: String,
        /// Only this architecture.
        #[arg(long)]
        arch: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build a .deb from a package manifest (see README: "Packaging a component").
    Package {
        /// The package manifest (TOML).
        manifest: PathBuf,
        /// Override the manifest's version.
        #[arg(long)]
        version: Option<String>,
        /// Override the manifest's architecture.
        #[arg(long)]
        arch: Option<String>,
        /// Where to write the .deb.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Everything on this machine: embedded broker, repository with a sample package, lab devices,
    /// and a guided tour (needs root: the devices are systemd-nspawn containers).
    Demo {
        /// How many devices (lab-1 ... lab-N).
        #[arg(long, default_value_t = 3)]
        devices: u32,
        /// The agent .deb (default: target/debs/debfleet-agent_*.deb).
        #[arg(long)]
        agent_deb: Option<PathBuf>,
        /// Where the embedded broker listens.
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker_listen: std::net::SocketAddr,
        /// Where the repository server listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        repo_listen: std::net::SocketAddr,
        /// Where the web console listens (a user `demo` with a fresh password is made for it).
        #[arg(long, default_value = "127.0.0.1:8088")]
        web_listen: std::net::SocketAddr,
    },
    /// Devices on this machine (systemd-nspawn containers running the agent): up, status, exec,
    /// reboot, kill, boot, down.
    Lab {
        /// The command and its arguments.
        #[command(subcommand)]
        command: lab::LabCommand,
    },
    /// Print a shell completion script: `debfleet completions bash > /etc/bash_completion.d/debfleet`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (debfleet.1, debfleet-agent.1) into a directory (for packaging).
    #[command(hide = true)]
    Manpages {
        /// The directory to write them to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Package deltas, offline: `make` one from two versions of a package, `apply` one to the
    /// old version to get the new (verified before it is written).
    Delta {
        /// make or apply.
        #[command(subcommand)]
        action: delta::DeltaAction,
    },
    /// Operator keys for signed commands.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Per-device credentials and ACLs for a real Mosquitto: a password file in its own format
    /// and an ACL file, generated from --dir (see README: "Securing a fleet").
    Broker {
        #[command(subcommand)]
        action: broker::BrokerAction,
        /// Where the broker's configuration lives.
        #[arg(long, global = true, env = "DEBFLEET_BROKER_DIR", default_value = "/etc/debfleet/broker")]
        dir: PathBuf,
    },
    /// The web console: the fleet live in a browser, with sign-in, roles and an audit log.
    Web {
        #[command(subcommand)]
        command: Option<WebCommand>,
        /// Address to serve on: loopback over plain HTTP, anything with --tls-cert and --tls-key.
        #[arg(long, default_value = "127.0.0.1:8088")]
        listen: std::net::SocketAddr,
        /// Serve HTTPS with this certificate chain (PEM); cookies are then marked Secure.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The users file [default: ~/.config/debfleet/web-users].
        #[arg(long, global = true)]
        users: Option<PathBuf>,
        /// The audit log [default: ~/.config/debfleet/audit.log].
        #[arg(long)]
        audit: Option<PathBuf>,
    },
    /// The web console's audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run the zero-setup services: an embedded MQTT broker on 127.0.0.1, the rollout controller
    /// and the web console.
    Serve {
        /// Address the embedded broker listens on.
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: std::net::SocketAddr,
        /// Do not run the rollout controller beside the broker.
        #[arg(long)]
        no_rollouts: bool,
        /// Address the web console listens on (loopback: `debfleet web` serves HTTPS elsewhere)
        /// [default: 127.0.0.1:8088; if that is taken, serve goes on without the console].
        #[arg(long)]
        web_listen: Option<std::net::SocketAddr>,
        /// Do not run the web console.
        #[arg(long)]
        no_web: bool,
        /// The web console's users file [default: ~/.config/debfleet/web-users].
        #[arg(long)]
        users: Option<PathBuf>,
        /// The web console's audit log [default: ~/.config/debfleet/audit.log].
        #[arg(long)]
        audit: Option<PathBuf>,
        /// Require a password from every client, checked against this broker configuration
        /// (debfleet broker init, add-device, add-user); needed to listen beyond loopback.
        #[arg(long)]
        broker_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub(crate) struct LogsArgs {
    /// DEVICE [UNIT], or only UNIT with --group/--all.
    words: Vec<String>,
    /// Every device in this group, merged by time.
    #[arg(long, conflicts_with = "all")]
    group: Option<String>,
    /// Every device.
    #[arg(long)]
    all: bool,
    /// Only entries from this long ago on (90s, 10m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// At most this many entries per device (the newest; 1 to 1000).
    #[arg(long, default_value_t = 100)]
    lines: u32,
    /// Seconds to wait for the devices.
    #[arg(long, default_value_t = 20.0)]
    timeout: f64,
    /// Print JSON instead of lines (with --follow: one JSON object per line).
    #[arg(long)]
    json: bool,
    /// Then go on showing new entries as they come, until Ctrl-C (or for this long: 30s, 10m).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "DURATION")]
    follow: Option<String>,
}

#[derive(Subcommand)]
enum KeyAction {
    /// Make an ed25519 key pair: NAME.key (private, 0600) and NAME.pub (for the devices'
    /// /etc/debfleet/operators.d/). A new name per key: rotating is adding the new .pub to the
    /// devices, then removing the old one.
    Generate {
        /// The key's name (devices look it up as operators.d/NAME.pub), e.g. ana-2026.
        name: String,
        /// Where to write the pair [default: ~/.config/debfleet/keys].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum WebCommand {
    /// The web console's users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user (or change their role and password); the password is read from stdin.
    Add {
        /// The user's name (a-z 0-9 . _ -, at most 32).
        name: String,
        /// viewer (reads), operator (also acts on devices) or admin.
        #[arg(long)]
        role: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the log's hash chain: exit 0 when intact, 1 (TAMPERED) when a line was edited or removed.
    Verify {
        /// The log [default: ~/.config/debfleet/audit.log].
        file: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
pub struct PackageArgs {
    /// Devices, then the package (with --group or --all: just the package).
    pub words: Vec<String>,
    /// Every device in this group (one publish; the broker fans out).
    #[arg(long, conflicts_with = "all")]
    pub group: Option<String>,
    /// Every device in the fleet (one publish).
    #[arg(long)]
    pub all: bool,
    /// Show what each device would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds to watch the package's units before calling the change good.
    #[arg(long)]
    pub watch: Option<u32>,
    /// Seconds to wait for all devices.
    #[arg(long, default_value_t = 900.0)]
    pub timeout: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl PackageArgs {
    fn request(self, verb: debfleet_protocol::Verb, purge: bool, everything: bool) -> packages::PackageRequest {
        packages::PackageRequest {
            verb,
            words: self.words,
            group: self.group,
            all: self.all,
            purge,
            dry_run: self.dry_run,
            watch_s: self.watch,
            everything,
            timeout: self.timeout,
            json: self.json,
        }
    }
}

#[derive(Subcommand)]
enum CfgAction {
    /// Print the effective configuration.
    Get {
        /// The device's id.
        device: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change keys, e.g. `telemetry.cpu.interval_s=5 logs.level=debug`.
    Set {
        /// The device's id.
        device: String,
        /// KEY=VALUE pairs (dotted keys; values as JSON where they parse).
        #[arg(required = true)]
        assignments: Vec<String>,
        /// Seconds to wait for the device.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone)]
pub struct Ctx {
    pub broker: String,
    pub ca_file: Option<PathBuf>,
    pub topics: debfleet_protocol::Topics,
    /// `--expires`: how long commands stay good.
    pub expires: Option<std::time::Duration>,
    /// `--by` (or $USER): who asks.
    pub by: Option<String>,
    /// Broker user name and password.
    pub credentials: Option<(String, String)>,
    /// `--sign-key`: signs every command.
    pub signer: Option<std::sync::Arc<keys::Signer>>,
}

impl Ctx {
    pub fn connect_options(&self) -> session::ConnectOptions<'_> {
        session::ConnectOptions {
            url: &self.broker,
            ca_file: self.ca_file.as_deref(),
            prefix: self.topics.prefix(),
            credentials: self.credentials.as_ref(),
            signer: self.signer.as_ref(),
        }
    }
}

/// The broker password: from the file named, else DEBFLEET_BROKER_PASSWORD (kept out of the
/// command line, where any local user could read it in the process list).
fn broker_credentials(
    user: Option<String>,
    password_file: Option<PathBuf>,
) -> anyhow::Result<Option<(String, String)>> {
    use anyhow::Context as _;
    let Some(user) = user else {
        if password_file.is_some() {
            anyhow::bail!("--broker-password-file needs --broker-user");
        }
        return Ok(None);
    };
    let password = match password_file {
        Some(p) => std::fs::read_to_string(&p)
            .with_context(|| format!("reading the broker password from {}", p.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
        None => std::env::var("DEBFLEET_BROKER_PASSWORD")
            .context("--broker-user needs a password: --broker-password-file FILE or DEBFLEET_BROKER_PASSWORD")?,
    };
    Ok(Some((user, password)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => return finish(manual::completions(*shell)),
        Command::Manpages { out } => return finish(manual::manpages(out)),
        _ => {}
    }
    let topics = match debfleet_protocol::Topics::new(&cli.prefix) {
        Ok(t) => t,
        Err(_) => {
            eprintln!("debfleet: --prefix {:?} is not a valid topic prefix", cli.prefix);
            return ExitCode::from(exit::USAGE);
        }
    };
    let file = match repo::ConsoleConfig::load() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("debfleet: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let broker = cli.broker.or(file.broker).unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let expires = cli.expires.map(std::time::Duration::from_secs);
    let by = cli.by.or_else(|| std::env::var("USER").ok()).filter(|b| !b.is_empty());
    if let Some(Err(e)) = by.as_deref().map(debfleet_protocol::ids::check_by) {
        eprintln!("debfleet: --by: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let credentials = match broker_credentials(
        cli.broker_user.or(file.broker_user),
        cli.broker_password_file.or(file.broker_password_file),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("debfleet: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let signer = match cli.sign_key.as_deref().map(keys::Signer::load).transpose() {
        Ok(s) => s.map(std::sync::Arc::new),
        Err(e) => {
            eprintln!("debfleet: --sign-key: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let ctx = Ctx { broker, ca_file: cli.ca_file.or(file.ca_file), topics, expires, by, credentials, signer };
    let (repo_url, token) = (cli.repo.or(file.repo), cli.token.or(file.token));
    let repo_cmd = match &cli.command {
        Command::Publish { .. } | Command::Packages { .. } | Command::Promote { .. } | Command::Unpublish { .. } => {
            true
        }
        _ => false,
    };
    if repo_cmd {
        let access = repo_url.map(|url| repo::RepoAccess { url, token, insecure: cli.insecure });
        let result = repo::RepoClient::new(access).and_then(|client| match cli.command {
            Command::Publish { files, suite, json } => repo::publish(&client, &files, &suite, json),
            Command::Packages { suite, json } => repo::packages(&client, suite.as_deref(), json),
            Command::Promote { package, from, to, json } => {
                let (n, v) = repo::name_version(&package)?;
                let out = client.promote(&n, &v, &from, &to)?;
                print_repo_result(&out, json, &format!("promoted {n}={v} from {from} to {to}"))
            }
            Command::Unpublish { package, suite, arch, json } => {
                let (n, v) = repo::name_version(&package)?;
                let out = client.remove(&n, &v, &suite, arch.as_deref())?;
                print_repo_result(&out, json, &format!("removed {n}={v} from {suite}"))
            }
            _ => unreachable!("repository commands only"),
        });
        return finish(result);
    }
    if let Command::Package { manifest, version, arch, out } = &cli.command {
        let opts = debfleet_packaging::BuildOptions {
            version: version.clone(),
            architecture: arch.clone(),
            source_date_epoch: debfleet_packaging::BuildOptions::epoch_from_env(),
            out_dir: out.clone(),
        };
        return match debfleet_packaging::load(manifest).and_then(|m| debfleet_packaging::build(&m, manifest, &opts)) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("debfleet: {e}");
                let code = if matches!(e, debfleet_packaging::PackagingError::Manifest { .. }) {
                    exit::USAGE
                } else {
                    exit::FAILED
                };
                ExitCode::from(code)
            }
        };
    }
    if let Command::Demo { devices, agent_deb, broker_listen, repo_listen, web_listen } = cli.command {
        return finish(demo::run(&ctx, demo::DemoArgs { devices, agent_deb, broker_listen, repo_listen, web_listen }));
    }
    if let Command::Delta { action } = cli.command {
        return finish(delta::run(action));
    }
    if let Command::Lab { command } = cli.command {
        return finish(lab::run(&ctx, command));
    }
    if let Command::Serve { listen, no_rollouts, web_listen, no_web, users, audit, broker_dir } = cli.command {
        let required = web_listen.is_some();
        let web = (!no_web).then(|| web::WebOptions {
            listen: web_listen.unwrap_or_else(|| ([127, 0, 0, 1], 8088).into()),
            repo: repo_url.map(|url| repo::RepoAccess { url, token, insecure: cli.insecure }),
            tls: None,
            users: users.unwrap_or_else(|| web::default_path("web-users")),
            audit: audit.unwrap_or_else(|| web::default_path("audit.log")),
        });
        return match serve::run(listen, Some(&ctx), !no_rollouts, web.map(|w| (w, required)), broker_dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.downcast_ref::<cmds::UsageError>().is_some() => {
                eprintln!("debfleet: {e:#}");
                ExitCode::from(exit::USAGE)
            }
            Err(e) => {
                eprintln!("debfleet: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Devices { json } => cmds::devices(&ctx, json).await,
            Command::Show { device, json } => cmds::show(&ctx, &device, json).await,
            Command::Ping { targets, timeout, json } => cmds::ping(&ctx, &targets, timeout, json).await,
            Command::Logs(args) => cmds::logs(&ctx, args).await,
            Command::Shell { device, command } => remote::shell(&ctx, &device, command).await,
            Command::Forward { device, spec } => remote::forward(&ctx, &device, &spec).await,
            Command::Cfg { action: CfgAction::Get { device, json } } => cmds::cfg_get(&ctx, &device, json).await,
            Command::Cfg { action: CfgAction::Set { device, assignments, timeout, json } } => {
                cmds::cfg_set(&ctx, &device, &assignments, timeout, json).await
            }
            Command::Watch { device, group, json } => watch::run(&ctx, device, group, json).await,
            Command::Monitor { group } => monitor::run(&ctx, group).await,
            Command::Install { pkg } => {
                packages::run(&ctx, pkg.request(debfleet_protocol::Verb::Install, false, false)).await
            }
            Command::Upgrade { pkg, everything } => {
                packages::run(&ctx, pkg.request(debfleet_protocol::Verb::Upgrade, false, everything)).await
            }
            Command::Uninstall { pkg, purge } => {
                packages::run(&ctx, pkg.request(debfleet_protocol::Verb::Uninstall, purge, false)).await
            }
            Command::Rollback { pkg } => {
                packages::run(&ctx, pkg.request(debfleet_protocol::Verb::Rollback, false, false)).await
            }
            Command::Restart { device, unit, json } => packages::restart_unit(&ctx, &device, &unit, json).await,
            Command::Ops { device, clear, older_than, json } => cmds::ops(&ctx, &device, clear, older_than, json).await,
            Command::Component { command } => components::run(&ctx, command).await,
            Command::Desired { command } => desired::run(&ctx, command).await,
            Command::Rollout { command } => rollout::run(&ctx, command).await,
            Command::Broker { action, dir } => broker::run(&dir, ctx.topics.prefix(), action),
            Command::Key { action: KeyAction::Generate { name, dir } } => {
                let (private, public) = keys::generate(&name, &dir.unwrap_or_else(keys::default_dir))?;
                println!(
                    "private key: {} (keep it: --sign-key or DEBFLEET_SIGN_KEY)\npublic key:  {} (install it on the devices as /etc/debfleet/operators.d/{name}.pub)",
                    private.display(),
                    public.display()
                );
                Ok(0)
            }
            Command::Web {
                command: Some(WebCommand::User { command: UserCommand::Add { name, role } }),
                users,
                ..
            } => {
                let role = debfleet_protocol::Role::parse(&role)
                    .ok_or_else(|| cmds::usage(format!("{role:?}: the roles are viewer, operator and admin")))?;
                web::add_user(&users.unwrap_or_else(|| web::default_path("web-users")), &name, role)
            }
            Command::Web { command: None, listen, users, audit, tls_cert, tls_key } => {
                let opts = web::WebOptions {
                    listen,
                    repo: repo_url.map(|url| repo::RepoAccess { url, token, insecure: cli.insecure }),
                    tls: tls_cert.zip(tls_key),
                    users: users.unwrap_or_else(|| web::default_path("web-users")),
                    audit: audit.unwrap_or_else(|| web::default_path("audit.log")),
                };
                web::serve(&ctx, opts).await
            }
            Command::Audit { command: AuditCommand::Verify { file } } => {
                web::verify_audit(&file.unwrap_or_else(|| web::default_path("audit.log")))
            }
            _ => unreachable!("handled above"),
        }
    });
    finish(result)
}

fn print_repo_result(out: &serde_json::Value, json: bool, human: &str) -> anyhow::Result<u8> {
    if json {
        println!("{}", serde_json::to_string_pretty(out)?);
    } else {
        println!("{human}");
    }
    Ok(0)
}

fn finish(result: anyhow::Result<u8>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("debfleet: {e:#}");
            let code = if e.downcast_ref::<session::Refused>().is_some() {
                exit::REFUSED
            } else if e.downcast_ref::<session::Unreachable>().is_some() {
                exit::UNREACHABLE
            } else if e.downcast_ref::<cmds::UsageError>().is_some() {
                exit::USAGE
            } else {
                exit::FAILED
            };
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                out.push(format!("{path} {} (the command itself)", sub.get_name()));
            }
            undocumented(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_of_every_command_has_a_line_of_help() {
        Cli::command().debug_assert();
        let mut missing = Vec::new();
        undocumented(&Cli::command(), "debfleet", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:#?}");
    }
}
