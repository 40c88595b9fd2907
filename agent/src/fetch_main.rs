//! `debfleet-fetch`: downloads one delta and rebuilds a package from it, for the agent
//! (docs/delta.md). A process of its own, so that the HTTP client, the delta code and the tens
//! of MiB a rebuild takes never add to the agent's resident memory.
//!
//! Input: one argument, a JSON `FetchRequest`. Exit 0: the rebuilt package is at `out`,
//! verified against the index's hashes. Exit 1: a JSON `Fallback` on stdout says why not.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use debfleet_protocol::{Fallback, FallbackReason};
use sha2::{Digest, Sha256};

#[path = "fetch_request.rs"]
mod fetch_request;
use fetch_request::FetchRequest;

fn main() {
    let request: Result<FetchRequest, String> = std::env::args()
        .nth(1)
        .ok_or_else(|| "usage: debfleet-fetch REQUEST-JSON".to_owned())
        .and_then(|a| serde_json::from_str(&a).map_err(|e| format!("bad request: {e}")));
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            eprintln!("debfleet-fetch: {e}");
            std::process::exit(2);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(&request)) {
        Ok(()) => {}
        Err(fallback) => {
            println!("{}", serde_json::to_string(&fallback).unwrap_or_default());
            std::process::exit(1);
        }
    }
}

async fn run(r: &FetchRequest) -> Result<(), Fallback> {
    let fail = |reason, message: String| Fallback { reason, message };
    download(&r.url, &r.part, r.size, &r.sha256).await.map_err(|e| match e {
        DownloadError::Refused(m) => fail(FallbackReason::DeltaInvalid, m),
        DownloadError::Failed(m) => fail(FallbackReason::DownloadFailed, m),
    })?;
    apply_delay().await;
    let result = rebuild(&r.base, &r.part, &r.out, r);
    let _ = std::fs::remove_file(&r.part);
    result
}

/// Test hook: `DEBFLEET_AGENT_APPLY_DELAY_MS` holds a downloaded delta that long before it is
/// applied, so a test can cut the power in between.
async fn apply_delay() {
    if let Some(ms) = std::env::var("DEBFLEET_AGENT_APPLY_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn rebuild(base: &Path, delta: &Path, out: &Path, listed: &FetchRequest) -> Result<(), Fallback> {
    let invalid = |m: String| Fallback { reason: FallbackReason::DeltaInvalid, message: m };
    let base_bytes = std::fs::read(base).map_err(|e| Fallback {
        reason: FallbackReason::NoBase,
        message: format!("reading {}: {e}", base.display()),
    })?;
    let delta_bytes = std::fs::read(delta).map_err(|e| invalid(format!("reading the delta: {e}")))?;
    let (header, deb) = debfleet_delta::apply(&base_bytes, &delta_bytes).map_err(|e| match e {
        debfleet_delta::DeltaError::Mismatch(m) if m.starts_with("it applies to") => {
            Fallback { reason: FallbackReason::BaseMismatch, message: m }
        }
        other => invalid(other.to_string()),
    })?;
    if header.result.payload != listed.result_payload || header.base.payload != listed.base_payload {
        return Err(invalid("the delta is not the one the signed index lists".into()));
    }
    let tmp = out.with_extension("deb.tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&deb).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, out))
        .map_err(|e| invalid(format!("writing {}: {e}", out.display())))
}

enum DownloadError {
    /// What came is not what the index lists.
    Refused(String),
    Failed(String),
}

/// Downloads `url` to `dest` (resuming a partial file with a Range request, and again after a
/// dropped connection), at most `size` bytes, and checks its SHA-256.
async fn download(url: &str, dest: &Path, size: u64, sha256: &str) -> Result<(), DownloadError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| DownloadError::Failed(format!("http client: {e}")))?;
    let mut last = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt.min(4))).await;
        }
        match fetch_once(&client, url, dest, size).await {
            Ok(()) => {
                let bytes = tokio::fs::read(dest).await.map_err(|e| DownloadError::Failed(e.to_string()))?;
                let got = debfleet_delta::deb::hex(&Sha256::digest(&bytes));
                if got == sha256 {
                    return Ok(());
                }
                let _ = tokio::fs::remove_file(dest).await;
                return Err(DownloadError::Refused(format!("{url}: SHA-256 {got}, the signed index says {sha256}")));
            }
            Err(Some(refused)) => {
                let _ = tokio::fs::remove_file(dest).await;
                return Err(DownloadError::Refused(refused));
            }
            Err(None) => last = format!("{url}: the connection failed {} time(s)", attempt + 1),
        }
    }
    Err(DownloadError::Failed(last))
}

/// One request; `Err(None)` is worth retrying, `Err(Some(why))` is not.
async fn fetch_once(client: &reqwest::Client, url: &str, dest: &Path, size: u64) -> Result<(), Option<String>> {
    use tokio::io::AsyncWriteExt;
    let have = tokio::fs::metadata(dest).await.map(|m| m.len()).unwrap_or(0);
    if have > size {
        let _ = tokio::fs::remove_file(dest).await;
    }
    let have = have.min(size);
    if have == size && size > 0 {
        return Ok(());
    }
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req.send().await.map_err(|e| {
        tracing::info!("{url}: {e}");
        None
    })?;
    let status = resp.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT;
    if !status.is_success() {
        return Err(if status.is_server_error() { None } else { Some(format!("{url}: HTTP {status}")) });
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(dest)
        .await
        .map_err(|e| Some(format!("{}: {e}", dest.display())))?;
    let mut written = if resumed { have } else { 0 };
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                written += chunk.len() as u64;
                if written > size {
                    return Err(Some(format!("{url}: more than the {size} bytes the signed index lists")));
                }
                file.write_all(&chunk).await.map_err(|e| Some(format!("{}: {e}", dest.display())))?;
            }
            Ok(None) => break,
            Err(e) => {
                // Keep what came: the next attempt asks for the rest.
                let _ = file.flush().await;
                tracing::info!("{url}: dropped after {written} bytes: {e}");
                return Err(None);
            }
        }
    }
    file.flush().await.map_err(|e| Some(e.to_string()))?;
    if written < size {
        return Err(None);
    }
    Ok(())
}
