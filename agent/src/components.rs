//! The components' socket: the agent listens on a Unix socket (mode 0660, group `debfleet`
//! when it exists) and turns each connection into numbered frames for the core. A reader task
//! per connection checks each frame's length before reading it and ends the connection on a
//! bad one or a flood; a writer task sends the core's frames. Nothing a component does can
//! stop the agent: its connection ends, the agent goes on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use debfleet_protocol::component::{decode, encode, frame_len, Down, Up};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::Event;

/// Connections at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 32;
/// Frames a connection may send in one second before it is cut off (a well-behaved component
/// sends a few a second at most; the runtime gates its streams).
const MAX_FRAMES_PER_S: u32 = 200;
/// Frames waiting for one component; a component this far behind is not reading.
const QUEUE: usize = 64;

/// A frame for a connection, and whether the connection ends after it.
type Outgoing = mpsc::Sender<(Down, bool)>;

/// The writers of the open connections, by number.
#[derive(Clone, Default)]
pub struct Registry {
    writers: Arc<Mutex<HashMap<u64, Outgoing>>>,
}

impl Registry {
    /// Queues a frame for a connection; a connection that cannot take it is closed.
    pub fn send(&self, conn: u64, frame: Down, close: bool) {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = w.get(&conn) else { return };
        if tx.try_send((frame, close)).is_err() {
            tracing::warn!("component connection {conn} is not reading its frames; closing it");
            w.remove(&conn);
        }
    }

    fn len(&self) -> usize {
        self.writers.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Binds the socket: its directory created, a stale socket file from an earlier run replaced,
/// access for root and the `debfleet` group only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another agent listens there"));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group_id("debfleet") {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: a valid NUL-terminated path; -1 leaves the owner as it is.
        if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
            tracing::warn!("cannot give {} to the debfleet group: {}", path.display(), std::io::Error::last_os_error());
        }
    }
    Ok(listener)
}

fn group_id(name: &str) -> Option<u32> {
    let group = std::fs::read_to_string("/etc/group").ok()?;
    group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1).and_then(|g| g.parse().ok())).flatten()
    })
}

/// Accepts connections until the listener fails; each one's frames become core events.
pub fn spawn(listener: UnixListener, events: mpsc::Sender<Event>, registry: Registry) -> tokio::task::JoinHandle<()> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("components' socket: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if registry.len() >= MAX_CONNECTIONS {
                tracing::warn!("{MAX_CONNECTIONS} components are connected already; refusing another");
                continue;
            }
            let conn = NEXT.fetch_add(1, Ordering::Relaxed);
            let pid = stream.peer_cred().ok().and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
            let (tx, rx) = mpsc::channel(QUEUE);
            registry.writers.lock().unwrap_or_else(|p| p.into_inner()).insert(conn, tx);
            let (read, write) = stream.into_split();
            // The agent ending a connection (a refused hello) stops its reader too.
            let ended = CancellationToken::new();
            tokio::spawn(write_frames(write, rx, ended.clone()));
            let (events, registry) = (events.clone(), registry.clone());
            tokio::spawn(async move {
                let why = tokio::select! {
                    r = read_frames(read, conn, pid, &events) => r.err(),
                    () = ended.cancelled() => Some("closed by the agent".into()),
                };
                if let Some(why) = why {
                    tracing::info!("component connection {conn}: {why}");
                }
                registry.writers.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
                let _ = events.send(Event::ComponentClosed { conn }).await;
            });
        }
    })
}

async fn read_frames(
    mut read: tokio::net::unix::OwnedReadHalf,
    conn: u64,
    pid: Option<u32>,
    events: &mpsc::Sender<Event>,
) -> Result<(), String> {
    let mut second = (Instant::now(), 0u32);
    loop {
        let mut header = [0u8; 4];
        if let Err(e) = read.read_exact(&mut header).await {
            return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof { "closed".into() } else { e.to_string() });
        }
        let n = frame_len(header).map_err(|e| e.to_string())?;
        let mut body = vec![0u8; n];
        read.read_exact(&mut body).await.map_err(|e| format!("closed mid-frame: {e}"))?;
        let frame: Up = decode(&body).map_err(|e| e.to_string())?;
        if second.0.elapsed() >= Duration::from_secs(1) {
            second = (Instant::now(), 0);
        }
        second.1 += 1;
        if second.1 > MAX_FRAMES_PER_S {
            return Err(format!("more than {MAX_FRAMES_PER_S} frames in a second; cut off"));
        }
        if events.send(Event::Component { conn, pid, frame }).await.is_err() {
            return Ok(());
        }
    }
}

async fn write_frames(
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::Receiver<(Down, bool)>,
    ended: CancellationToken,
) {
    while let Some((frame, close)) = rx.recv().await {
        let Ok(bytes) = encode(&frame) else { continue };
        let sent = tokio::time::timeout(Duration::from_secs(5), write.write_all(&bytes)).await;
        if close || !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    let _ = write.shutdown().await;
    ended.cancel();
}
