//! `debfleet delta make|apply`: package deltas for anyone, offline (format: docs/delta.md).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use crate::cmds::usage;

#[derive(Subcommand)]
pub enum DeltaAction {
    /// Make the delta that turns OLD.deb into NEW.deb.
    Make {
        /// The version devices have.
        old: PathBuf,
        /// The version they should get.
        new: PathBuf,
        /// Where to write the delta.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Rebuild the new package from OLD.deb and a delta; nothing is written unless the result
    /// matches the new package exactly (control fields and files).
    Apply {
        /// The old package the delta was made from.
        old: PathBuf,
        /// The delta.
        delta: PathBuf,
        /// Where to write the rebuilt package.
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes beside the target and renames: a reader never sees half a file.
fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            e
        })
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(action: DeltaAction) -> anyhow::Result<u8> {
    // Every refusal of the delta code is about the input: exit 2, as for bad usage.
    let refused = |e: debfleet_delta::DeltaError| usage(e.to_string());
    match action {
        DeltaAction::Make { old, new, output } => {
            let (o, n) = (read(&old)?, read(&new)?);
            let delta = debfleet_delta::make(&o, &n).map_err(refused)?;
            write(&output, &delta)?;
            let (header, _, _) = debfleet_delta::open(&delta).map_err(refused)?;
            println!(
                "{} {} -> {}: delta {} bytes, {:.1}% of the new package ({} bytes)",
                header.result.package,
                header.base.version,
                header.result.version,
                delta.len(),
                100.0 * delta.len() as f64 / n.len().max(1) as f64,
                n.len()
            );
        }
        DeltaAction::Apply { old, delta, output } => {
            let (o, d) = (read(&old)?, read(&delta)?);
            let (header, deb) = debfleet_delta::apply(&o, &d).map_err(refused)?;
            write(&output, &deb)?;
            println!(
                "{} {} rebuilt and verified (payload {})",
                header.result.package, header.result.version, header.result.payload
            );
        }
    }
    Ok(0)
}
