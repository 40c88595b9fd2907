//! `debfleet-repo`: a self-hosted, signed apt repository with a publish API.

mod compress;
mod control;
mod deb;
mod deltas;
mod fsutil;
mod http;
mod indices;
mod pdiff;
mod signing;
mod store;
mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::signing::Signer;
use crate::store::{Repo, RepoConfig};
use crate::tokens::Tokens;

#[derive(Parser)]
#[command(name = "debfleet-repo", version, about = "A self-hosted, signed apt repository with a publish API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a repository: directories, signing key, first publish token (printed once).
    Init {
        /// The repository's directory.
        #[arg(long)]
        root: PathBuf,
        /// Use this OpenPGP secret key (armored or binary, no passphrase) instead of generating one.
        #[arg(long)]
        import_key: Option<PathBuf>,
        /// Origin and Label of the signed Release.
        #[arg(long, default_value = "debfleet")]
        origin: String,
        /// Versions kept per package in each suite.
        #[arg(long, default_value_t = 5)]
        retention: usize,
        /// Name of the first token.
        #[arg(long, default_value = "admin")]
        token_name: String,
        /// How long a signed Release stays valid (its Valid-Until: 7d, 12h, 30m, 90s); a serving
        /// repository signs it again when half of that is left. Devices refuse a Release past it,
        /// so an attacker cannot hold them on an old repository state.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        valid_for: u64,
    },
    /// Serve the repository and the publish API.
    Serve {
        /// The repository's directory.
        #[arg(long)]
        root: PathBuf,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Add many .deb files to a suite at once (one index rebuild): for migrating a repository.
    Import {
        /// The repository's directory.
        #[arg(long)]
        root: PathBuf,
        /// The suite to add them to.
        #[arg(long)]
        suite: String,
        /// The .deb files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Make the deltas the suites want now, and list them (a serving repository makes them in
    /// the background after each publish).
    Deltas {
        /// The repository's directory.
        #[arg(long)]
        root: PathBuf,
        /// Forget every delta (or a suite's) and make them all again.
        #[arg(long)]
        rebuild: bool,
        /// Only this suite (with --rebuild).
        #[arg(long, requires = "rebuild")]
        suite: Option<String>,
    },
    /// Manage publish tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Write the man page (debfleet-repo.1) to standard output (for packaging).
    #[command(hide = true)]
    Manpage,
    /// Print the public key (binary, for apt's signed-by=, unless --armor).
    ExportKey {
        /// The repository's directory.
        #[arg(long)]
        root: PathBuf,
        /// ASCII-armored instead of binary.
        #[arg(long)]
        armor: bool,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a token for a team; it is printed once.
    Add {
        /// The team's name.
        name: String,
        /// The repository's directory.
        #[arg(long)]
        root: PathBuf,
        /// Package names the token may publish, promote and remove (a name, or a prefix ending
        /// in '*'; comma-separated or repeated). Without it: every package.
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// Suites the token may change (comma-separated or repeated). Without it: every suite.
        #[arg(long, value_delimiter = ',')]
        suites: Vec<String>,
    },
    /// Revoke a team's token (takes effect at once).
    Revoke {
        /// The team's name.
        name: String,
        /// The repository's directory.
        #[arg(long)]
        root: PathBuf,
    },
    List {
        /// The repository's directory.
        #[arg(long)]
        root: PathBuf,
    },
}

fn main() {
    let level = std::env::var("DEBFLEET_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .with_max_level(level)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("debfleet-repo: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Manpage => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
        }
        Command::Init { root, import_key, origin, retention, token_name, valid_for } => {
            if retention == 0 {
                anyhow::bail!("--retention must be at least 1");
            }
            let signer = match import_key {
                Some(p) => Signer::import(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)?,
                None => Signer::generate(&format!("{origin} repository signing key"))?,
            };
            let config = RepoConfig {
                label: origin.clone(),
                origin,
                retention,
                valid_for_secs: valid_for,
                ..RepoConfig::default()
            };
            Repo::init(&root, &signer, config)?;
            let token = Tokens::new(&Repo::tokens_path(&root)).add(&token_name, tokens::Scope::default())?;
            println!("repository created in {}", root.display());
            println!("signing key fingerprint: {}", signer.fingerprint());
            println!("publish token {token_name:?} (shown once, keep it safe):\n{token}");
        }
        Command::Serve { root, listen } => {
            let repo = Repo::open(&root)?;
            let state = Arc::new(http::AppState { repo, tokens: Tokens::new(&Repo::tokens_path(&root)) });
            spawn_delta_builder(state.clone());
            spawn_resigner(state.clone());
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                tracing::info!("serving {} on http://{listen}", root.display());
                axum::serve(listener, http::router(state)).with_graceful_shutdown(shutdown()).await?;
                anyhow::Ok(())
            })?;
        }
        Command::Import { root, suite, files } => {
            let repo = Repo::open(&root)?;
            let done = repo.import(&suite, &files).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("imported {} package(s) into {suite}", done.added.len());
            if !done.pruned.is_empty() {
                println!(
                    "not kept ({} versions are kept per package): {}",
                    repo.config.retention,
                    done.pruned.join(", ")
                );
            }
        }
        Command::Deltas { root, rebuild, suite } => {
            let repo = Repo::open(&root)?;
            if rebuild {
                repo.forget_deltas(suite.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            let n = repo.build_deltas()?;
            println!("{n} pair(s) settled now");
            for (suite, d) in repo.delta_records().map_err(|e| anyhow::anyhow!("{e}"))? {
                let what = match &d.outcome {
                    deltas::Outcome::Built { size, filename, .. } => format!("{size} bytes\t{filename}"),
                    deltas::Outcome::Skipped { reason } => format!("skipped: {reason}"),
                };
                println!("{suite}\t{} {}\t{} -> {}\t{what}", d.name, d.arch, d.from, d.to);
            }
        }
        Command::Token { action: TokenAction::Add { name, root, packages, suites } } => {
            let scope = tokens::Scope::new(packages, suites)?;
            let token = Tokens::new(&Repo::tokens_path(&root)).add(&name, scope)?;
            println!("{token}");
        }
        Command::Token { action: TokenAction::Revoke { name, root } } => {
            Tokens::new(&Repo::tokens_path(&root)).revoke(&name)?;
            println!("revoked {name}");
        }
        Command::Token { action: TokenAction::List { root } } => {
            for t in Tokens::new(&Repo::tokens_path(&root)).list()? {
                let state = t.revoked.map(|r| format!("revoked {r}")).unwrap_or_else(|| "active".into());
                println!("{}\tcreated {}\t{state}\t{}", t.name, t.created, t.scope);
            }
        }
        Command::ExportKey { root, armor } => {
            let signer = Signer::load(&root.join("keys/signing.asc"))?;
            use std::io::Write;
            let bytes = if armor { signer.public_armored()?.into_bytes() } else { signer.public_binary()? };
            std::io::stdout().write_all(&bytes)?;
        }
    }
    Ok(())
}

/// One thread makes deltas, one pair at a time, woken by each change (and once a minute, for
/// changes another process made, such as `debfleet-repo import`).
fn spawn_delta_builder(state: Arc<http::AppState>) {
    let (tx, rx) = std::sync::mpsc::channel();
    state.repo.set_delta_wake(tx);
    std::thread::spawn(move || loop {
        if let Err(e) = state.repo.build_deltas() {
            tracing::warn!("making deltas: {e:#}");
        }
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => while rx.try_recv().is_ok() {},
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
    });
}

/// Keeps every suite's Release valid: signs it again when half its validity is left. Checked
/// ten times per validity period (at most hourly, at least every second).
fn spawn_resigner(state: Arc<http::AppState>) {
    let period = (state.repo.config.valid_for() / 10)
        .clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600));
    std::thread::spawn(move || loop {
        if let Err(e) = state.repo.refresh_signatures() {
            tracing::error!("signing Release again: {e:#}");
        }
        std::thread::sleep(period);
    });
}

/// `7d`, `12h`, `30m`, `90s` or plain seconds, at least two seconds.
fn parse_duration(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: expected a number with s, m, h or d (7d, 12h)")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{text:?}: expected a number with s, m, h or d (7d, 12h)"))?;
    match n.checked_mul(scale) {
        Some(secs) if secs >= 2 => Ok(secs),
        Some(_) => Err("must be at least 2s".into()),
        None => Err(format!("{text:?} is too long")),
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod cli_tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_has_a_line_of_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if !matches!(a.get_id().as_str(), "help" | "version") && a.get_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "debfleet-repo", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("90"), Ok(90));
        assert!(parse_duration("1s").is_err());
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
